//! Fragmented datagrams through the rewrite, with real traffic: the pod sends 3,000- and
//! 9,000-byte UDP datagrams from a connected socket to the Service's external address (MTU
//! 1,500 everywhere, so the pod fragments them) and reads the echo: the node reassembles both
//! ways for its conntrack NAT and fragments the reply again onto the pod's veth. Every
//! fragment must be translated — the requests' later fragments by the destination their first
//! got, the replies' by the source — or the echo never reaches the socket (connected to the
//! external address). Before fragments were translated, none arrived. Needs root.
mod common;

use std::{net::SocketAddr, time::Duration};

use common::{
    agent::{Agent, Scratch, lab_agent_args, lab_service_yaml, wait_for, write},
    kube::counter,
};
use lab::{Lab, Ns};

#[test]
fn fragmented_udp_requests_and_replies_are_translated_fragment_by_fragment() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let services = scratch.file("services.yaml");
    write(&services, &lab_service_yaml("web"));
    let agent = Agent::start(&scratch, &lab_agent_args(services.to_str().unwrap()));
    wait_for("the frontends and the pod interface", Duration::from_secs(20), || {
        let state = scratch.try_inspect().unwrap_or_default();
        state["frontends"].as_array().is_some_and(|f| f.len() >= 6)
            && state["interfaces"].as_array().is_some_and(|i| !i.is_empty())
    });
    for external in [SocketAddr::from((lab::EXTERNAL_V4, 8080)), SocketAddr::from((lab::EXTERNAL_V6, 8080))] {
        for size in [3_000usize, 9_000] {
            let before = counter(&scratch.inspect(), "frag_translated");
            let payload: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
            let reply = lab
                .udp_request(Ns::Pod, external, &payload, Duration::from_secs(3), true)
                .unwrap_or_else(|e| panic!("{size} bytes to {external}: {e:#}\n{}", agent.log()));
            assert_eq!(reply.from, external, "the echo comes from the address dialled");
            assert_eq!(reply.data.len(), size + 5, "{size} bytes to {external}: the whole echo");
            assert!(reply.data[5..] == payload[..], "{size} bytes to {external}: the echo is intact");
            // At MTU 1,500: 3 (3,000 bytes) or 7 (9,000) fragments each way, every one translated.
            let fragments = size.div_ceil(1_400) as u64;
            let translated = counter(&scratch.inspect(), "frag_translated") - before;
            assert!(
                translated >= 2 * fragments - 2,
                "{size} bytes to {external}: only {translated} fragments translated"
            );
        }
    }
    assert_eq!(counter(&scratch.inspect(), "frag_unmatched"), 0, "every later fragment found its first");
    drop(agent);
}
