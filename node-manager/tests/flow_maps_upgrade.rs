//! Upgrading from an agent that kept UDP and ICMP echo flows in the TCP flow map: the new agent
//! finds `NM_FLOWS` pinned (adopted, its entries keep serving) and no `NM_FLOWS_DGRAM`, and
//! copies the datagram flows into the map it creates, so their replies stay translated. Loads
//! the datapath on a private bpffs (nothing attached). Needs root.
mod common;

use aya::maps::{HashMap, Map, MapData};
use common::bpffs::Bpffs;
use node_manager::kernel::{Datapath, pins::Pins};
use node_manager_common::{Flow, FlowKey, PROTO_TCP, PROTO_UDP, map_names, v4_mapped};

fn key(proto: u8, pod_port: u16) -> FlowKey {
    FlowKey {
        pod_addr: v4_mapped([192, 0, 2, 10]),
        remote_addr: v4_mapped([198, 51, 100, 10]),
        pod_port: pod_port.to_be(),
        remote_port: 53u16.to_be(),
        proto,
        pad: [0; 3],
    }
}

#[test]
fn an_older_agents_datagram_flows_move_into_their_own_map() {
    let bpffs = Bpffs::new();
    let pins = Pins::new(&bpffs.0);
    let external = Flow { external_addr: v4_mapped([203, 0, 113, 10]) };
    {
        let _first = Datapath::load_pinned(&bpffs.0).expect("load (run as root)");
        // What the older agent left: UDP and TCP flows in NM_FLOWS, no datagram map.
        let data = MapData::from_pin(pins.map(map_names::FLOWS)).unwrap();
        let mut flows: HashMap<_, FlowKey, Flow> = HashMap::try_from(Map::LruHashMap(data)).unwrap();
        flows.insert(key(PROTO_UDP, 40000), external, 0).unwrap();
        flows.insert(key(PROTO_TCP, 40001), external, 0).unwrap();
        std::fs::remove_file(pins.map(map_names::FLOWS_DGRAM)).unwrap();
    }
    let dp = Datapath::load_pinned(&bpffs.0).expect("load again");
    assert_eq!(dp.fresh_maps(), [map_names::FLOWS_DGRAM], "only the datagram map is new");
    assert_eq!(dp.flow(&key(PROTO_UDP, 40000)).unwrap(), Some(external), "the UDP flow, now in NM_FLOWS_DGRAM");
    assert_eq!(dp.flow(&key(PROTO_TCP, 40001)).unwrap(), Some(external), "the TCP flow stays in NM_FLOWS");
    // The copy is in the pinned datagram map itself, for the new programs.
    let data = MapData::from_pin(pins.map(map_names::FLOWS_DGRAM)).unwrap();
    let dgram: HashMap<_, FlowKey, Flow> = HashMap::try_from(Map::LruHashMap(data)).unwrap();
    assert_eq!(dgram.get(&key(PROTO_UDP, 40000), 0).unwrap(), external);
    assert!(dgram.get(&key(PROTO_TCP, 40001), 0).is_err(), "TCP flows are not copied");
}
