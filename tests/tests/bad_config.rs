//! Test 9: bad configuration is refused with an error that names the key and the line, the
//! process exits non-zero, and the kernel is untouched.

use std::process::Command;

use uplink_tests::{Netns, uplinkd_bin};

const BASE: &str = r#"[agent]
name = "gw-test"
state_dir = "STATE"
resync_interval = "10s"

[lan]
interfaces = ["br-lan"]
prefixes = []
client_idle_timeout = "10m"

[[uplink]]
name = "isp1"
interface = "wan1"
gateway = "100.64.1.1"
gateway6 = "2001:db8:100:1::1"
weight = 2

[[uplink]]
name = "isp2"
interface = "wan2"
gateway = "100.64.2.1"
"#;

struct Case {
    name: &'static str,
    /// (from, to) replacement applied to BASE, or the whole text when `from` is empty.
    edit: (&'static str, &'static str),
    /// Expected `path:line: key` prefix pieces.
    line: Option<usize>,
    key: &'static str,
    /// A phrase the message must carry (what is valid).
    hint: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "uplink balance is gone",
        edit: ("weight = 2", "weight = 2\nbalance = \"client\""),
        line: Some(17),
        key: "uplink[0].balance",
        hint: "[dispatch] balance",
    },
    Case {
        name: "dispatch failover",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[dispatch]\nbalance = \"failover\"\n",
        ),
        line: Some(24),
        key: "dispatch.balance",
        hint: "for a [[policy]]",
    },
    Case {
        name: "unknown policy",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[rule]]\nname = \"r\"\ndst = [\"198.51.100.0/24\"]\npolicy = \"voip\"\n",
        ),
        line: Some(26),
        key: "rule[0].policy",
        hint: "use one of: main, default",
    },
    Case {
        name: "unknown uplink in policy",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[policy]]\nname = \"p\"\nuplinks = [\"isp1\", \"lte\"]\n",
        ),
        line: Some(25),
        key: "policy[0].uplinks[1]",
        hint: "uplinks are: isp1, isp2",
    },
    Case {
        name: "empty match",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[policy]]\nname = \"p\"\n\n[[rule]]\nname = \"r\"\npolicy = \"p\"\n",
        ),
        line: Some(26),
        key: "rule[0].name",
        hint: "at least one of src, dst",
    },
    Case {
        name: "empty list",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[policy]]\nname = \"p\"\n\n[[rule]]\nname = \"r\"\ndst = []\npolicy = \"p\"\n",
        ),
        line: Some(28),
        key: "rule[0].dst",
        hint: "an empty list matches nothing",
    },
    Case {
        name: "bad port range",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[policy]]\nname = \"p\"\n\n[[rule]]\nname = \"r\"\ndport = [\"2000-1000\"]\npolicy = \"p\"\n",
        ),
        line: Some(28),
        key: "rule[0].dport[0]",
        hint: "the start is above the end",
    },
    Case {
        name: "port out of range",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[policy]]\nname = \"p\"\n\n[[rule]]\nname = \"r\"\nsport = [70000]\npolicy = \"p\"\n",
        ),
        line: Some(28),
        key: "rule[0].sport[0]",
        hint: "1-65535",
    },
    Case {
        name: "ports with icmp",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[policy]]\nname = \"p\"\n\n[[rule]]\nname = \"r\"\nproto = \"icmp\"\ndport = [80]\npolicy = \"p\"\n",
        ),
        line: Some(29),
        key: "rule[0].dport",
        hint: "ports need proto",
    },
    Case {
        name: "unknown dscp name",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[policy]]\nname = \"p\"\n\n[[rule]]\nname = \"r\"\ndscp = [\"expedited\"]\npolicy = \"p\"\n",
        ),
        line: Some(28),
        key: "rule[0].dscp[0]",
        hint: "use 0-63 or one of",
    },
    Case {
        name: "unknown protocol",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[policy]]\nname = \"p\"\n\n[[rule]]\nname = \"r\"\nproto = \"sctp\"\npolicy = \"p\"\n",
        ),
        line: Some(28),
        key: "rule[0].proto",
        hint: "use tcp, udp",
    },
    Case {
        name: "duplicate policy name",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[policy]]\nname = \"p\"\n\n[[policy]]\nname = \"p\"\n",
        ),
        line: Some(27),
        key: "policy[1].name",
        hint: "duplicate policy name",
    },
    Case {
        name: "duplicate rule name",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[policy]]\nname = \"p\"\n\n[[rule]]\nname = \"r\"\nproto = \"udp\"\npolicy = \"p\"\n\n[[rule]]\nname = \"r\"\nproto = \"tcp\"\npolicy = \"p\"\n",
        ),
        line: Some(32),
        key: "rule[1].name",
        hint: "duplicate rule name",
    },
    Case {
        name: "duplicate set name",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[set]]\nname = \"s\"\n\n[[set]]\nname = \"s\"\n",
        ),
        line: Some(27),
        key: "set[1].name",
        hint: "duplicate set name",
    },
    Case {
        name: "set used before declared",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[policy]]\nname = \"p\"\n\n[[rule]]\nname = \"r\"\ndst = [\"@saas\"]\npolicy = \"p\"\n\n[[set]]\nname = \"saas\"\nelements = [\"198.51.100.0/24\"]\n",
        ),
        line: Some(28),
        key: "rule[0].dst[0]",
        hint: "declare sets above",
    },
    Case {
        name: "unknown set",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[policy]]\nname = \"p\"\n\n[[rule]]\nname = \"r\"\ndst = [\"@saas\"]\npolicy = \"p\"\n",
        ),
        line: Some(28),
        key: "rule[0].dst[0]",
        hint: "declared sets: none",
    },
    Case {
        name: "external set with elements",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[set]]\nname = \"s\"\nexternal = true\nelements = [\"198.51.100.0/24\"]\n",
        ),
        line: Some(26),
        key: "set[0].elements",
        hint: "an external set is filled by someone else",
    },
    Case {
        name: "bad set element",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[set]]\nname = \"s\"\nelements = [\"198.51.100.0/33\"]\n",
        ),
        line: Some(25),
        key: "set[0].elements[0]",
        hint: "use a CIDR",
    },
    Case {
        name: "reserved policy name",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[policy]]\nname = \"main\"\n",
        ),
        line: Some(24),
        key: "policy[0].name",
        hint: "is reserved",
    },
    Case {
        name: "loss ratio out of range",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[policy]]\nname = \"p\"\nmax_loss = 2.0\n",
        ),
        line: Some(25),
        key: "policy[0].max_loss",
        hint: "ratio from 0.0",
    },
    Case {
        name: "bad max_rtt",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[policy]]\nname = \"p\"\nmax_rtt = \"fast\"\n",
        ),
        line: Some(25),
        key: "policy[0].max_rtt",
        hint: "invalid duration",
    },
    Case {
        name: "sla without probes",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[policy]]\nname = \"p\"\nmax_rtt = \"100ms\"\n",
        ),
        line: Some(24),
        key: "policy[0].max_rtt",
        hint: "none of this policy",
    },
    Case {
        name: "bad when_none",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[policy]]\nname = \"p\"\nwhen_none = \"blackhole\"\n",
        ),
        line: Some(25),
        key: "policy[0].when_none",
        hint: "or \"drop\"",
    },
    Case {
        name: "iif not on the LAN",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[policy]]\nname = \"p\"\n\n[[rule]]\nname = \"r\"\niif = [\"wan1\"]\npolicy = \"p\"\n",
        ),
        line: Some(28),
        key: "rule[0].iif[0]",
        hint: "is not a LAN interface",
    },
    Case {
        name: "families that cannot meet",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[policy]]\nname = \"p\"\n\n[[rule]]\nname = \"r\"\nsrc = [\"192.168.1.0/24\"]\ndst = [\"2001:db8::/32\"]\npolicy = \"p\"\n",
        ),
        line: Some(26),
        key: "rule[0].name",
        hint: "neither IPv4 nor IPv6",
    },
    Case {
        name: "unknown key",
        edit: ("weight = 2", "wieght = 2"),
        line: Some(16),
        key: "wieght",
        hint: "expected one of",
    },
    Case {
        name: "zero weight",
        edit: ("weight = 2", "weight = 0"),
        line: Some(16),
        key: "uplink[0].weight",
        hint: "between 1 and 1000",
    },
    Case {
        name: "duplicate name",
        edit: ("name = \"isp2\"", "name = \"isp1\""),
        line: Some(19),
        key: "uplink[1].name",
        hint: "must be unique",
    },
    Case {
        name: "duplicate interface",
        edit: ("interface = \"wan2\"", "interface = \"wan1\""),
        line: Some(20),
        key: "uplink[1].interface",
        hint: "must be unique",
    },
    Case {
        name: "bad gateway",
        edit: ("100.64.1.1", "100.64.1.300"),
        line: Some(14),
        key: "uplink[0].gateway",
        hint: "invalid IPv4 address",
    },
    Case {
        name: "bad gateway6",
        edit: ("2001:db8:100:1::1", "2001:db8::zz"),
        line: Some(15),
        key: "uplink[0].gateway6",
        hint: "invalid IPv6 address",
    },
    Case {
        name: "bad prefix",
        edit: ("prefixes = []", "prefixes = [\"198.19.0.0/33\"]"),
        line: Some(8),
        key: "lan.prefixes[0]",
        hint: "CIDR",
    },
    Case {
        name: "bad duration",
        edit: ("\"10s\"", "\"10 parsecs\""),
        line: Some(4),
        key: "agent.resync_interval",
        hint: "\"250ms\", \"10s\", \"10m\"",
    },
    Case {
        name: "no lan interfaces",
        edit: ("interfaces = [\"br-lan\"]", "interfaces = []"),
        line: Some(7),
        key: "lan.interfaces",
        hint: "at least one LAN interface",
    },
    Case {
        name: "duplicate mark",
        edit: ("weight = 2", "weight = 2\nmark = 2"),
        line: Some(19),
        key: "uplink[1].mark",
        hint: "marks must be unique",
    },
    Case {
        name: "duplicate table",
        edit: ("weight = 2", "weight = 2\ntable = 1002"),
        line: Some(19),
        key: "uplink[1].table",
        hint: "tables must be unique",
    },
    Case {
        name: "table outside owned range",
        edit: ("weight = 2", "weight = 2\ntable = 254"),
        line: Some(17),
        key: "uplink[0].table",
        hint: "within uplinkd's tables",
    },
    Case {
        name: "mark beyond mask",
        edit: ("weight = 2", "weight = 2\nmark = 64"),
        line: Some(17),
        key: "uplink[0].mark",
        hint: "between 1 and 63",
    },
    Case {
        name: "non-contiguous mask",
        edit: ("[lan]", "[dataplane]\nfwmark_mask = 0x0f0f\n\n[lan]"),
        line: Some(7),
        key: "dataplane.fwmark_mask",
        hint: "contiguous",
    },
    Case {
        name: "policy mark bits overlap the uplink mark bits",
        edit: (
            "[lan]",
            "[dataplane]\npolicy_mark_mask = 0x03000000\n\n[lan]",
        ),
        line: Some(7),
        key: "dataplane.policy_mark_mask",
        hint: "overlaps dataplane.fwmark_mask 0x3f000000",
    },
    Case {
        name: "non-contiguous policy mask",
        edit: ("[lan]", "[dataplane]\npolicy_mark_mask = 0x0f0f\n\n[lan]"),
        line: Some(7),
        key: "dataplane.policy_mark_mask",
        hint: "contiguous",
    },
    Case {
        name: "lan and uplink share an interface",
        edit: ("interface = \"wan1\"", "interface = \"br-lan\""),
        line: Some(13),
        key: "uplink[0].interface",
        hint: "also listed in lan.interfaces",
    },
    Case {
        name: "unknown section",
        edit: ("[agent]", "[agnet]"),
        line: Some(1),
        key: "agnet",
        hint: "expected one of",
    },
    Case {
        name: "wrong type",
        edit: ("weight = 2", "weight = \"two\""),
        line: Some(16),
        key: "",
        hint: "invalid type",
    },
    Case {
        name: "syntax error",
        edit: ("weight = 2", "weight = = 2"),
        line: Some(16),
        key: "",
        hint: "",
    },
    Case {
        name: "bad probe",
        edit: ("weight = 2", "weight = 2\nprobes = [\"ping:203.0.113.10\"]"),
        line: Some(17),
        key: "uplink[0].probes[0]",
        hint: "\"http://ADDRESS[:PORT]/PATH\" or \"dns:SERVER[:PORT]/NAME\"",
    },
    Case {
        name: "quorum above probes",
        edit: (
            "weight = 2",
            "weight = 2\nprobes = [\"icmp:203.0.113.10\"]\nprobe_quorum = 2",
        ),
        line: Some(18),
        key: "uplink[0].probe_quorum",
        hint: "between 1 and 1",
    },
    Case {
        name: "tier zero",
        edit: ("weight = 2", "weight = 2\ntier = 0"),
        line: Some(17),
        key: "uplink[0].tier",
        hint: "between 1 and 9",
    },
    Case {
        name: "loss above one",
        edit: ("[lan]", "[health]\nmax_loss = 1.5\n\n[lan]"),
        line: Some(7),
        key: "health.max_loss",
        hint: "ratio between 0.0 and 1.0",
    },
    Case {
        name: "passive not a boolean",
        edit: ("[lan]", "[health]\npassive = \"yes\"\n\n[lan]"),
        line: Some(7),
        key: "",
        hint: "expected a boolean",
    },
    Case {
        name: "bad probe interval",
        edit: ("[lan]", "[health]\ninterval = \"fast\"\n\n[lan]"),
        line: Some(7),
        key: "health.interval",
        hint: "\"250ms\", \"10s\", \"10m\"",
    },
    Case {
        name: "bad failback mode",
        edit: ("[lan]", "[failover]\nfailback = \"sometimes\"\n\n[lan]"),
        line: Some(7),
        key: "",
        hint: "expected `auto` or `manual`",
    },
    Case {
        name: "interface name with an nft wildcard",
        edit: ("interface = \"wan1\"", "interface = \"wan*\""),
        line: Some(13),
        key: "uplink[0].interface",
        hint: "A-Z a-z 0-9 - _ .",
    },
    Case {
        name: "zero state save interval",
        edit: (
            "resync_interval = \"10s\"",
            "resync_interval = \"10s\"\nstate_save_interval = \"0s\"",
        ),
        line: Some(5),
        key: "agent.state_save_interval",
        hint: "greater than zero",
    },
    Case {
        name: "bad full resync interval",
        edit: (
            "resync_interval = \"10s\"",
            "resync_interval = \"10s\"\nfull_resync_interval = \"often\"",
        ),
        line: Some(5),
        key: "agent.full_resync_interval",
        hint: "\"250ms\", \"10s\", \"10m\"",
    },
    Case {
        name: "no clients allowed",
        edit: (
            "client_idle_timeout = \"10m\"",
            "client_idle_timeout = \"10m\"\nmax_clients = 0",
        ),
        line: Some(10),
        key: "lan.max_clients",
        hint: "between 1 and 1000000",
    },
    Case {
        name: "client usage not a boolean",
        edit: (
            "client_idle_timeout = \"10m\"",
            "client_idle_timeout = \"10m\"\nclient_usage = \"yes\"",
        ),
        line: Some(10),
        key: "lan.client_usage",
        hint: "expected a boolean",
    },
    Case {
        name: "routed default route",
        edit: (
            "client_idle_timeout = \"10m\"",
            "client_idle_timeout = \"10m\"\nrouted = [\"10.20.0.0/24\", \"0.0.0.0/0\"]",
        ),
        line: Some(10),
        key: "lan.routed[1]",
        hint: "not a default route",
    },
    Case {
        name: "nflog group out of range",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[dataplane]\nnflog_group = 70000\n",
        ),
        line: Some(24),
        key: "dataplane.nflog_group",
        hint: "between 1 and 65535",
    },
    Case {
        name: "too many addresses per client",
        edit: (
            "client_idle_timeout = \"10m\"",
            "client_idle_timeout = \"10m\"\nmax_addresses_per_client = 5000",
        ),
        line: Some(10),
        key: "lan.max_addresses_per_client",
        hint: "between 1 and 1024",
    },
    Case {
        name: "zero metrics connections",
        edit: ("[lan]", "[metrics]\nmax_connections = 0\n\n[lan]"),
        line: Some(7),
        key: "metrics.max_connections",
        hint: "between 1 and 10000",
    },
    Case {
        name: "zero excused rounds",
        edit: ("[lan]", "[health]\npassive_max_rounds = 0\n\n[lan]"),
        line: Some(7),
        key: "health.passive_max_rounds",
        hint: "between 1 and 10000",
    },
    Case {
        name: "a passive window too short to tell silence from a round trip",
        edit: ("[lan]", "[health]\npassive_window = \"5ms\"\n\n[lan]"),
        line: None,
        key: "health.passive_window",
        hint: "between 20ms and 10s",
    },
    Case {
        name: "a burst of no probes",
        edit: ("[lan]", "[health]\nburst_count = 0\n\n[lan]"),
        line: Some(7),
        key: "health.burst_count",
        hint: "between 1 and 20",
    },
    Case {
        name: "a burst interval longer than a second",
        edit: ("[lan]", "[health]\nburst_interval = \"2s\"\n\n[lan]"),
        line: None,
        key: "health.burst_interval",
        hint: "between 1ms and 1s",
    },
    Case {
        name: "no destinations needed for a passive down",
        edit: ("[lan]", "[health]\npassive_min_destinations = 0\n\n[lan]"),
        line: Some(7),
        key: "health.passive_min_destinations",
        hint: "between 1 and 1000",
    },
    Case {
        name: "standby interval shorter than the interval",
        edit: ("[lan]", "[health]\nstandby_interval = \"100ms\"\n\n[lan]"),
        line: None,
        key: "health.standby_interval",
        hint: "between health.interval (200ms) and 1h",
    },
    Case {
        name: "bad failback flows",
        edit: (
            "[lan]",
            "[failover]\nfailback_flows = \"teleport\"\n\n[lan]",
        ),
        line: Some(7),
        key: "",
        hint: "expected `keep` or `move`",
    },
    Case {
        name: "failback flows moved without policy bits",
        edit: (
            "[lan]",
            "[failover]\nfailback_flows = \"move\"\n\n[dataplane]\npolicy_mark_mask = 0\n\n[lan]",
        ),
        line: None,
        key: "failover.failback_flows",
        hint: "widen the mask, or use \"keep\"",
    },
    Case {
        name: "usage period from the 29th",
        edit: ("weight = 2", "weight = 2\nquota_reset = 29"),
        line: Some(17),
        key: "uplink[0].quota_reset",
        hint: "between 1 and 28",
    },
    Case {
        name: "daily usage period with a reset day",
        edit: (
            "weight = 2",
            "weight = 2\nquota_period = \"day\"\nquota_reset = 3",
        ),
        line: Some(18),
        key: "uplink[0].quota_reset",
        hint: "a daily period starts at midnight",
    },
    Case {
        name: "http probe by name",
        edit: (
            "weight = 2",
            "weight = 2\nprobes = [\"http://connectivitycheck.example/generate_204\"]",
        ),
        line: Some(17),
        key: "uplink[0].probes[0]",
        hint: "a name would be resolved outside the uplink",
    },
    Case {
        name: "probe_expect without an http probe",
        edit: ("weight = 2", "weight = 2\nprobe_expect = \"ok\""),
        line: Some(17),
        key: "uplink[0].probe_expect",
        hint: "add an \"http://ADDRESS/PATH\" probe",
    },
    Case {
        name: "quota in an unknown unit",
        edit: ("weight = 2", "weight = 2\nquota = \"20XB\""),
        line: Some(17),
        key: "uplink[0].quota",
        hint: "\"20GiB\" (binary",
    },
    Case {
        name: "quota of nothing",
        edit: ("weight = 2", "weight = 2\nquota = 0"),
        line: Some(17),
        key: "uplink[0].quota",
        hint: "leave quota out for no cap",
    },
    Case {
        name: "quota action without a quota",
        edit: ("weight = 2", "weight = 2\nquota_action = \"stop\""),
        line: None,
        key: "uplink[0].quota_action",
        hint: "set quota too",
    },
    Case {
        name: "unknown quota action",
        edit: (
            "weight = 2",
            "weight = 2\nquota = \"1GB\"\nquota_action = \"throttle\"",
        ),
        line: Some(18),
        key: "uplink[0].quota_action",
        hint: "standby",
    },
    Case {
        name: "bad command timeout",
        edit: ("[lan]", "[dataplane]\ncommand_timeout = \"soon\"\n\n[lan]"),
        line: Some(7),
        key: "dataplane.command_timeout",
        hint: "\"250ms\", \"10s\", \"10m\"",
    },
    Case {
        name: "bad conntrack flush mode",
        edit: ("[lan]", "[dataplane]\nconntrack_flush = \"fast\"\n\n[lan]"),
        line: Some(7),
        key: "",
        hint: "expected `netlink` or `tool`",
    },
    Case {
        name: "bad gateway",
        edit: ("gateway = \"100.64.2.1\"", "gateway = \"dhcp\""),
        line: Some(21),
        key: "uplink[1].gateway",
        hint: "\"auto\" (learned from the default route",
    },
    Case {
        name: "bad gateway6",
        edit: ("gateway6 = \"2001:db8:100:1::1\"", "gateway6 = \"ra\""),
        line: Some(15),
        key: "uplink[0].gateway6",
        hint: "\"auto\" (learned from router adverts)",
    },
    Case {
        name: "unknown local policy",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[[policy]]\nname = \"own\"\n\n[local]\npolicy = \"mine\"\n",
        ),
        line: Some(27),
        key: "local.policy",
        hint: "use one of \"main\", \"default\", \"own\"",
    },
    Case {
        name: "unknown local key",
        edit: (
            "gateway = \"100.64.2.1\"\n",
            "gateway = \"100.64.2.1\"\n\n[local]\nuplink = \"isp1\"\n",
        ),
        line: Some(24),
        key: "uplink",
        hint: "expected `policy`",
    },
    Case {
        name: "no uplinks",
        edit: ("", "[lan]\ninterfaces = [\"br-lan\"]\n"),
        line: None,
        key: "uplink",
        hint: "at least one [[uplink]]",
    },
    Case {
        name: "no lan",
        edit: ("", "[[uplink]]\nname = \"a\"\ninterface = \"wan1\"\n"),
        line: None,
        key: "lan",
        hint: "missing [lan]",
    },
];

fn kernel_snapshot(ns: &Netns) -> anyhow::Result<String> {
    let mut s = ns.exec(&["nft", "list", "ruleset"])?;
    s += &ns.exec(&["ip", "rule", "show"])?;
    s += &ns.exec(&["ip", "-6", "rule", "show"])?;
    s += &ns.exec(&["ip", "route", "show", "table", "all"])?;
    Ok(s)
}

#[test]
fn bad_configs_name_key_and_line_and_touch_nothing() -> anyhow::Result<()> {
    let ns = Netns::new("cfg")?;
    let dir = std::env::temp_dir().join(&ns.0);
    std::fs::create_dir_all(&dir)?;
    let before = kernel_snapshot(&ns)?;
    let mut failures = Vec::new();
    for case in CASES {
        let state = dir.join("state");
        let text = if case.edit.0.is_empty() {
            case.edit.1.to_string()
        } else {
            BASE.replacen(case.edit.0, case.edit.1, 1)
        };
        assert_ne!(text, BASE, "case {} did not change the config", case.name);
        let text = text.replace("STATE", state.to_str().unwrap());
        let path = dir.join(format!("{}.toml", case.name.replace(' ', "-")));
        std::fs::write(&path, &text)?;
        let mut prefix = path.display().to_string();
        if let Some(line) = case.line {
            prefix += &format!(":{line}");
        }
        if !case.key.is_empty() {
            prefix += &format!(": {}: ", case.key);
        }
        for args in [
            vec!["check-config".to_string(), path.display().to_string()],
            vec!["--config".into(), path.display().to_string(), "run".into()],
        ] {
            let out = Command::new("ip")
                .args(["netns", "exec", &ns.0])
                .arg(uplinkd_bin())
                .args(&args)
                .output()?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            let ok = out.status.code() == Some(2)
                && stderr.starts_with(&format!("error: {prefix}"))
                && stderr.contains(case.hint);
            if !ok {
                failures.push(format!(
                    "{} ({}): exit {:?}, stderr {stderr:?}, wanted prefix {prefix:?} and {:?}",
                    case.name,
                    args[0],
                    out.status.code(),
                    case.hint
                ));
            }
        }
        assert!(!state.exists(), "{}: state dir created", case.name);
    }
    assert!(CASES.len() >= 12);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(
        kernel_snapshot(&ns)?,
        before,
        "a refused config touched the kernel"
    );

    // The base config itself is valid, so every case above failed for its own edit.
    let path = dir.join("good.toml");
    std::fs::write(
        &path,
        BASE.replace("STATE", dir.join("state").to_str().unwrap()),
    )?;
    let out = Command::new(uplinkd_bin())
        .arg("check-config")
        .arg(&path)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A missing `nft` binary is a clear error at start, before anything is touched.
#[test]
fn missing_nft_is_a_clear_error() -> anyhow::Result<()> {
    let ns = Netns::new("nonft")?;
    let dir = std::env::temp_dir().join(&ns.0);
    std::fs::create_dir_all(&dir)?;
    let before = kernel_snapshot(&ns)?;
    let path = dir.join("c.toml");
    let text = BASE
        .replace("STATE", dir.join("state").to_str().unwrap())
        .replace("[lan]", "[dataplane]\nnft = \"/nonexistent/nft\"\n\n[lan]");
    std::fs::write(&path, text)?;
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(uplinkd_bin())
        .arg("--config")
        .arg(&path)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot run \"/nonexistent/nft\" (dataplane.nft)")
            && stderr.contains("install the nftables package"),
        "{stderr}"
    );
    assert_eq!(kernel_snapshot(&ns)?, before);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
