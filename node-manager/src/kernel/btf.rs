//! Just enough of a BTF reader to find where a field sits in a kernel struct, so the netfilter
//! programs read `struct sk_buff` at the running kernel's offsets (they move between kernels and
//! configs) instead of hard-coded ones.
use std::path::Path;

use anyhow::{Context as _, Result, bail, ensure};

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// Byte offset of `member` in `struct strukt` per the BTF at `path` (fields of anonymous
/// structs/unions are found too).
pub fn member_offset_in(path: &Path, strukt: &str, member: &str) -> Result<u32> {
    let data = std::fs::read(path)
        .with_context(|| format!("reading kernel BTF {} (needs CONFIG_DEBUG_INFO_BTF)", path.display()))?;
    member_offset(&data, strukt, member).with_context(|| format!("in {}", path.display()))
}

struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    /// (name_off, type id, offset word) for struct/union members.
    members: Vec<(u32, u32, u32)>,
}

pub fn member_offset(data: &[u8], strukt: &str, member: &str) -> Result<u32> {
    let btf = parse(data)?;
    let name = |off: u32| -> &[u8] {
        let strings = &btf.strings[(off as usize).min(btf.strings.len())..];
        &strings[..strings.iter().position(|&b| b == 0).unwrap_or(strings.len())]
    };
    let Some(id) = btf
        .types
        .iter()
        .position(|t| t.kind == KIND_STRUCT && !t.members.is_empty() && name(t.name_off) == strukt.as_bytes())
    else {
        bail!("no struct {strukt} in BTF");
    };
    // Depth-first through anonymous members; ids are 1-based (0 is void).
    let mut stack = vec![(id + 1, 0u32)];
    while let Some((id, base_bits)) = stack.pop() {
        let t = btf.types.get(id - 1).with_context(|| format!("BTF type id {id} out of range"))?;
        for &(member_name, member_type, offset) in &t.members {
            let bits = base_bits + if t.kind_flag { offset & 0x00ff_ffff } else { offset };
            if name(member_name) == member.as_bytes() {
                ensure!(bits.is_multiple_of(8), "{strukt}.{member} is a bitfield at bit {bits}");
                return Ok(bits / 8);
            }
            if member_name == 0 {
                let inner = member_type as usize;
                if let Some(it) = btf.types.get(inner.wrapping_sub(1))
                    && (it.kind == KIND_STRUCT || it.kind == KIND_UNION)
                {
                    stack.push((inner, bits));
                }
            }
        }
    }
    bail!("struct {strukt} has no member {member} in BTF")
}

struct Btf<'a> {
    types: Vec<Type>,
    strings: &'a [u8],
}

fn parse(data: &[u8]) -> Result<Btf<'_>> {
    let u32_at = |at: usize| -> Result<u32> {
        let b = data.get(at..at + 4).context("BTF truncated")?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    ensure!(data.len() >= 24, "BTF shorter than its header");
    let magic = u16::from_le_bytes([data[0], data[1]]);
    ensure!(magic == BTF_MAGIC, "not little-endian BTF (magic {magic:#x})");
    let hdr_len = u32_at(4)? as usize;
    let (type_off, type_len, str_off, str_len) = (u32_at(8)?, u32_at(12)?, u32_at(16)?, u32_at(20)?);
    let types_start = hdr_len + type_off as usize;
    let types_end = types_start + type_len as usize;
    let str_start = hdr_len + str_off as usize;
    let strings = data.get(str_start..str_start + str_len as usize).context("BTF string section out of range")?;
    ensure!(types_end <= data.len(), "BTF type section out of range");

    let mut types = Vec::new();
    let mut at = types_start;
    while at < types_end {
        let (name_off, info) = (u32_at(at)?, u32_at(at + 4)?);
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        at += 12;
        let mut members = Vec::new();
        // Size of the data following the common header, per kind (linux/btf.h).
        let extra = match kind {
            1 | 14 | 17 => 4, // INT, VAR, DECL_TAG
            3 => 12,          // ARRAY
            KIND_STRUCT | KIND_UNION => {
                for i in 0..vlen {
                    let m = at + i * 12;
                    members.push((u32_at(m)?, u32_at(m + 4)?, u32_at(m + 8)?));
                }
                vlen * 12
            }
            6 | 13 => vlen * 8,        // ENUM, FUNC_PROTO
            15 | 19 => vlen * 12,      // DATASEC, ENUM64
            2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
            other => bail!("unknown BTF kind {other} at byte {at}"),
        };
        at += extra;
        types.push(Type { name_off, kind, kind_flag: info >> 31 == 1, members });
    }
    Ok(Btf { types, strings })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: `struct outer { int a; union { int b; struct { int c; int d; }; }; }`
    /// with members at bits 0, 32 (union), and 64 inside the union's anonymous struct... as built
    /// by hand below.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0c\0d\0".to_vec();
        let s = |name: &str| {
            strings
                .windows(name.len() + 2)
                .position(|w| &w[1..=name.len()] == name.as_bytes() && w[0] == 0 && w[name.len() + 1] == 0)
                .unwrap() as u32
                + 1
        };
        let mut t = Vec::new();
        let mut ty = |name_off: u32, info: u32, size: u32, extra: &[u32]| {
            for v in [name_off, info, size].iter().chain(extra) {
                t.extend_from_slice(&v.to_le_bytes());
            }
        };
        ty(s("int"), 1 << 24, 4, &[32]); // 1: int
        ty(0, (4 << 24) | 2, 8, &[s("c"), 1, 0, s("d"), 1, 32]); // 2: anon struct { c; d; }
        ty(0, (5 << 24) | 2, 8, &[s("b"), 1, 0, 0, 2, 0]); // 3: anon union { b; struct 2 }
        ty(s("outer"), (4 << 24) | 2, 12, &[s("a"), 1, 0, 0, 3, 32]); // 4: struct outer
        let mut out = Vec::new();
        out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for v in [24u32, 0, t.len() as u32, t.len() as u32, strings.len() as u32] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&t);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_direct_and_anonymous_members() {
        let b = blob();
        assert_eq!(member_offset(&b, "outer", "a").unwrap(), 0);
        assert_eq!(member_offset(&b, "outer", "b").unwrap(), 4);
        assert_eq!(member_offset(&b, "outer", "c").unwrap(), 4);
        assert_eq!(member_offset(&b, "outer", "d").unwrap(), 8);
        assert!(member_offset(&b, "outer", "e").unwrap_err().to_string().contains("no member e"));
        assert!(member_offset(&b, "inner", "a").unwrap_err().to_string().contains("no struct inner"));
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        let b = blob();
        for len in 0..b.len() {
            let _ = member_offset(&b[..len], "outer", "d");
        }
        assert!(member_offset(b"not btf at all, really not", "outer", "a").is_err());
    }

    #[test]
    fn running_kernel_has_sk_buff_nfct() {
        let path = Path::new(VMLINUX);
        if !path.exists() {
            eprintln!("skipped: no {VMLINUX}");
            return;
        }
        let nfct = member_offset_in(path, "sk_buff", "_nfct").unwrap();
        let len = member_offset_in(path, "sk_buff", "len").unwrap();
        // Both live well inside the struct and apart (layouts differ between kernels).
        assert!(nfct > 0 && nfct < 512 && nfct.is_multiple_of(8), "_nfct at {nfct}");
        assert!(len > 0 && len < 512 && len != nfct, "len at {len}");
    }
}
