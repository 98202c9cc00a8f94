//! Conntrack's own statistics for this network namespace (`/proc/net/stat/nf_conntrack`: one
//! line per CPU, hexadecimal columns). Its `invalid` column counts what every mode acts on.
use std::fs;

pub const PATH: &str = "/proc/net/stat/nf_conntrack";

/// Total INVALID packets seen by conntrack, if the statistics are readable.
pub fn invalid_total() -> Option<u64> {
    parse_invalid(&fs::read_to_string(PATH).ok()?)
}

pub fn parse_invalid(text: &str) -> Option<u64> {
    let mut lines = text.lines();
    let column = lines.next()?.split_whitespace().position(|h| h == "invalid")?;
    lines.map(|l| l.split_whitespace().nth(column).and_then(|v| u64::from_str_radix(v, 16).ok())).sum()
}

#[cfg(test)]
mod tests {
    use super::parse_invalid;

    #[test]
    fn sums_the_invalid_column_over_cpus() {
        let text = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n\
                    00000002  00000000 00000000 00000000 0000000a 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000  00000000 00000000 00000000 00000000\n\
                    00000002  00000000 00000000 00000000 00000005 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000  00000000 00000000 00000000 00000000\n";
        assert_eq!(parse_invalid(text), Some(15));
        assert_eq!(parse_invalid("entries found\n1 2\n"), None);
        assert_eq!(parse_invalid("entries invalid\n1 zz\n"), None);
    }
}
