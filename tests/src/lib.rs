//! A namespace lab for uplink: a gateway, LAN clients, one ISP per uplink and an "internet"
//! host that answers every UDP datagram with the source address it saw. Used by the lab
//! command, the end-to-end tests and the benchmarks.
//!
//! Addresses are documentation, CGNAT and benchmark ranges only, inside the lab's own
//! namespaces. Every namespace name carries a per-lab prefix; all of them are deleted when
//! the `Lab` is dropped, also when a test fails.

use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod abuse;
pub mod container;
pub mod dhcp;
pub mod soak;

pub const ECHO_PORT: u16 = 9000;
pub const TCP_ECHO_PORT: u16 = 9001;
/// The internet host sends zeros to whoever connects here, as fast as TCP allows.
pub const BULK_PORT: u16 = 9002;
pub const SERVER4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x10);
pub const LAN_IF: &str = "br-lan";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// One uplink of the lab.
#[derive(Debug, Clone)]
pub struct UplinkSpec {
    pub name: String,
    pub weight: u32,
    /// Point-to-point: no gateway address, routed by device (like PPP).
    pub p2p: bool,
    /// Extra keys for this uplink's `[[uplink]]` table (probes, tier, ...).
    pub extra: String,
}

impl UplinkSpec {
    pub fn new(name: &str, weight: u32, p2p: bool) -> UplinkSpec {
        UplinkSpec {
            name: name.into(),
            weight,
            p2p,
            extra: String::new(),
        }
    }

    /// Adds keys to the uplink's config table, e.g. `tier = 2`.
    pub fn with(mut self, keys: &str) -> UplinkSpec {
        self.extra += keys;
        self.extra.push('\n');
        self
    }
}

pub struct Lab {
    pub prefix: String,
    pub dir: PathBuf,
    pub uplinks: Vec<UplinkSpec>,
    /// Client index → whether it has IPv6.
    pub clients: BTreeMap<u32, bool>,
    namespaces: Vec<String>,
    agent: Option<Child>,
    /// Extra environment for the agent process.
    pub agent_env: Vec<(String, String)>,
    /// Run the agent from an image's root filesystem, as the DaemonSet does.
    pub container: Option<container::Container>,
}

/// Runs a command, failing with its stderr.
pub fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Feeds `ip -batch` to one namespace: one process for many commands.
fn ip_batch(ns: &str, lines: &[String]) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped");
        stdin.write_all(lines.join("\n").as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ip -n {ns} -batch failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            lines.join("\n")
        );
    }
    Ok(())
}

/// Runs `f` on a thread that has entered namespace `ns`. Sockets made there stay in it.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = fs::File::open(&path).with_context(|| format!("open {path}"))?;
    std::thread::spawn(move || -> Result<T> {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
}

/// Sends a signal ("KILL", "TERM", "HUP") to a child. `ip netns exec` execs the agent, so
/// the child's pid is the agent's.
pub fn signal_child(child: &Child, signal: &str) -> Result<()> {
    use nix::sys::signal::{Signal, kill};
    let sig: Signal = format!("SIG{signal}")
        .parse()
        .with_context(|| format!("unknown signal {signal}"))?;
    kill(nix::unistd::Pid::from_raw(child.id() as i32), sig)
        .with_context(|| format!("kill -{signal} {}", child.id()))?;
    Ok(())
}

/// `ip netns exec NS uplinkctl --ca CA --cert certs/WHO.crt --key certs/WHO.key`, ready
/// for more arguments.
pub fn uplinkctl_in(ns: &str, certs: &Path, ca: &Path, who: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(uplinkctl_bin())
        .arg("--ca")
        .arg(ca)
        .arg("--cert")
        .arg(certs.join(format!("{who}.crt")))
        .arg("--key")
        .arg(certs.join(format!("{who}.key")));
    cmd
}

/// A CA and certificates in `dir`, made with uplinkctl: `gw` (agent, for 127.0.0.1 and
/// localhost), `op` (operator), `view` (viewer).
pub fn make_certs(dir: &Path) -> Result<()> {
    let d = dir.to_str().expect("utf-8 path");
    let ctl = uplinkctl_bin();
    let ctl = ctl.to_str().expect("utf-8 path");
    sh(&[ctl, "certs", "init", "--dir", d])?;
    sh(&[
        ctl,
        "certs",
        "issue",
        "--dir",
        d,
        "--agent",
        "gw",
        "--san",
        "127.0.0.1",
        "--san",
        "localhost",
    ])?;
    sh(&[ctl, "certs", "issue", "--dir", d, "--operator", "op"])?;
    sh(&[ctl, "certs", "issue", "--dir", d, "--viewer", "view"])?;
    Ok(())
}

/// Issues `dir/<name>.crt` and `.key` for an operator whose certificate expired an hour
/// ago, signed by `dir/ca.*` (uplinkctl refuses to issue one).
pub fn issue_expired_operator(dir: &Path, name: &str) -> Result<()> {
    let ca = rcgen::KeyPair::from_pem(&fs::read_to_string(dir.join("ca.key"))?)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&fs::read_to_string(dir.join("ca.crt"))?, ca)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.subject_alt_names.push(rcgen::SanType::URI(
        format!("{}operator", uplink_api::ROLE_URI_PREFIX).try_into()?,
    ));
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(2);
    params.not_after = now - time::Duration::hours(1);
    let key = rcgen::KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    fs::write(dir.join(format!("{name}.crt")), cert.pem())?;
    fs::write(dir.join(format!("{name}.key")), key.serialize_pem())?;
    Ok(())
}

/// Agents started by a test must not outlive it: a test process killed outright (a CI
/// timeout) never runs the Lab's Drop. The kernel kills the child when the thread that
/// spawned it ends, which for a lab is the test's own thread, after the Drop.
pub trait DiesWithSpawner {
    fn dies_with_spawner(&mut self) -> &mut Self;
}

impl DiesWithSpawner for Command {
    fn dies_with_spawner(&mut self) -> &mut Self {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            self.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            })
        }
    }
}

/// The most common lab: uplinks isp1 and isp2, weight 1 each, neither point-to-point.
/// mTLS for a gRPC client presenting `dir/<who>.crt`, trusting `dir/ca.crt`, for a
/// server certificate that names `domain`.
pub fn client_tls(
    dir: &Path,
    who: &str,
    domain: &str,
) -> Result<tonic::transport::ClientTlsConfig> {
    Ok(tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(fs::read(
            dir.join("ca.crt"),
        )?))
        .identity(tonic::transport::Identity::from_pem(
            fs::read(dir.join(format!("{who}.crt")))?,
            fs::read(dir.join(format!("{who}.key")))?,
        ))
        .domain_name(domain))
}

/// Two uplinks probing the internet host over ICMP (for silent failures and health).
pub fn probed_uplinks() -> Vec<UplinkSpec> {
    let probe = "probes = [\"icmp:203.0.113.10\"]";
    vec![
        UplinkSpec::new("isp1", 1, false).with(probe),
        UplinkSpec::new("isp2", 1, false).with(probe),
    ]
}

/// An address of the internet host in 203.0.113.0/24 (`serve_udp` answers there too).
pub fn internet_v4(last: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, last)), port)
}

pub fn two_uplinks() -> Vec<UplinkSpec> {
    vec![
        UplinkSpec::new("isp1", 1, false),
        UplinkSpec::new("isp2", 1, false),
    ]
}

/// Runs `op` again while it fails with EINTR. A socket read with a timeout is not restarted
/// by the kernel when the process takes a signal or is stopped and continued (a loaded CI
/// host does that); it returns EINTR, which is no answer from the network.
pub fn retry_eintr<T>(mut op: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    loop {
        match op() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Runs a command to the end: (exit code, stdout, stderr).
pub fn outcome(cmd: &mut Command) -> Result<(i32, String, String)> {
    let out = cmd.output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// uplinkctl next to uplinkd.
pub fn uplinkctl_bin() -> PathBuf {
    uplinkd_bin().with_file_name("uplinkctl")
}

pub fn uplinkd_bin() -> PathBuf {
    if let Ok(p) = std::env::var("UPLINKD_BIN") {
        return PathBuf::from(p);
    }
    // Test and bench binaries live in target/<profile>/deps or target/<profile>.
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("uplinkd");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --workspace` first (or set UPLINKD_BIN)",
        bin.display()
    );
    bin
}

impl Lab {
    /// Builds the topology: gateway with a LAN bridge, one ISP per uplink, the internet
    /// host with its echo server, and `clients` client namespaces (the first `v6_clients`
    /// also with IPv6).
    pub fn build(
        tag: &str,
        uplinks: Vec<UplinkSpec>,
        clients: u32,
        v6_clients: u32,
    ) -> Result<Lab> {
        let prefix = format!(
            "ul{}-{}-{}",
            tag,
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(&prefix);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let mut lab = Lab {
            prefix,
            dir,
            uplinks,
            clients: BTreeMap::new(),
            namespaces: Vec::new(),
            agent: None,
            agent_env: Vec::new(),
            container: None,
        };
        lab.build_core()?;
        for i in 1..=clients {
            lab.add_client(i, i <= v6_clients)?;
        }
        Ok(lab)
    }

    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    fn add_ns(&mut self, role: &str) -> Result<String> {
        let ns = self.ns(role);
        sh(&["ip", "netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        Ok(ns)
    }

    pub fn sysctl(&self, ns: &str, settings: &[&str]) -> Result<()> {
        let mut args = vec!["ip", "netns", "exec", ns, "sysctl", "-qw"];
        args.extend_from_slice(settings);
        sh(&args).map(|_| ())
    }

    fn build_core(&mut self) -> Result<()> {
        let gw = self.add_ns("gw")?;
        let inet = self.add_ns("inet")?;
        self.sysctl(
            &gw,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )?;
        self.sysctl(&inet, &["net.ipv6.conf.all.forwarding=0"])?;
        ip_batch(
            &gw,
            &[
                "link set lo up".into(),
                // A fixed address: a bridge without one takes its lowest port's MAC, so adding
                // a client would change the gateway's MAC under the others, which keep the old
                // one in their ARP cache and go unanswered until it expires (seconds).
                format!("link add {LAN_IF} address 02:00:00:00:00:01 type bridge"),
                format!("link set {LAN_IF} up"),
                format!("addr add 198.19.0.1/24 dev {LAN_IF}"),
                format!("addr add 2001:db8:1::1/64 dev {LAN_IF} nodad"),
            ],
        )?;
        ip_batch(
            &inet,
            &[
                "link set lo up".into(),
                format!("addr add {SERVER4}/32 dev lo"),
                format!("addr add {SERVER6}/128 dev lo"),
            ],
        )?;
        for k in 1..=self.uplinks.len() {
            let isp = self.add_ns(&format!("isp{k}"))?;
            // keep_addr_on_down: an ISP whose side of the link goes down (a carrier cut in the
            // lab) keeps its IPv6 addresses, as a real ISP router keeps its config.
            self.sysctl(
                &isp,
                &[
                    "net.ipv4.ip_forward=1",
                    "net.ipv6.conf.all.forwarding=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                    "net.ipv6.conf.all.keep_addr_on_down=1",
                ],
            )?;
            let p2p = self.uplinks[k - 1].p2p;
            ip_batch(
                &isp,
                &[
                    "link set lo up".into(),
                    format!("link add cpe type veth peer name wan{k} netns {gw}"),
                    format!("link add net type veth peer name isp{k} netns {inet}"),
                    "link set cpe up".into(),
                    "link set net up".into(),
                    if p2p {
                        format!("addr add 100.64.{k}.1/32 peer 100.64.{k}.2 dev cpe")
                    } else {
                        format!("addr add 100.64.{k}.1/24 dev cpe")
                    },
                    format!("addr add 2001:db8:100:{k}::1/64 dev cpe nodad"),
                    format!("addr add 198.18.{k}.1/24 dev net"),
                    format!("addr add 2001:db8:200:{k}::1/64 dev net nodad"),
                    format!("route add default via 198.18.{k}.2"),
                    format!("route add default via 2001:db8:200:{k}::2"),
                ],
            )?;
            // Like real ISPs (BCP 38), forward only the customer's own source addresses: a
            // reply sent out of the wrong uplink is dropped, not quietly delivered.
            let guard = format!(
                "add table inet isp_guard {{ chain guard {{ type filter hook forward priority -10; policy accept; iifname \"cpe\" ip saddr != 100.64.{k}.0/24 counter drop; iifname \"cpe\" ip6 saddr != 2001:db8:100:{k}::/64 counter drop; }}; }}"
            );
            sh(&["ip", "netns", "exec", &isp, "nft", &guard])?;
            if p2p {
                // A point-to-point link sends everything to the peer; on a veth the ISP side
                // stands in for that by answering ARP/ND for what it routes.
                self.sysctl(
                    &isp,
                    &[
                        "net.ipv4.conf.cpe.proxy_arp=1",
                        "net.ipv6.conf.cpe.proxy_ndp=1",
                        // A real point-to-point link answers at once; proxy ARP
                        // would otherwise wait up to 0.8 s.
                        "net.ipv4.neigh.cpe.proxy_delay=0",
                    ],
                )?;
                ip_batch(&isp, &[format!("neigh add proxy {SERVER6} dev cpe")])?;
            }
            ip_batch(
                &gw,
                &[
                    format!("link set wan{k} up"),
                    if p2p {
                        format!("addr add 100.64.{k}.2/32 peer 100.64.{k}.1 dev wan{k}")
                    } else {
                        format!("addr add 100.64.{k}.2/24 dev wan{k}")
                    },
                    format!("addr add 2001:db8:100:{k}::2/64 dev wan{k} nodad"),
                ],
            )?;
            ip_batch(
                &inet,
                &[
                    format!("link set isp{k} up"),
                    format!("addr add 198.18.{k}.2/24 dev isp{k}"),
                    format!("addr add 2001:db8:200:{k}::2/64 dev isp{k} nodad"),
                    format!("route add 100.64.{k}.0/24 via 198.18.{k}.1"),
                    format!("route add 2001:db8:100:{k}::/64 via 2001:db8:200:{k}::1"),
                ],
            )?;
        }
        self.start_echo(&inet)?;
        Ok(())
    }

    /// The uplink's number (1-based) by name.
    pub fn k(&self, uplink: &str) -> usize {
        self.uplinks
            .iter()
            .position(|u| u.name == uplink)
            .expect("lab uplink")
            + 1
    }

    /// Carrier cut: the ISP takes its side of the link down, so the gateway's interface
    /// loses LOWER_UP. `up` restores it.
    pub fn carrier(&self, uplink: &str, up: bool) -> Result<()> {
        let isp = self.ns(&format!("isp{}", self.k(uplink)));
        sh(&[
            "ip",
            "-n",
            &isp,
            "link",
            "set",
            "cpe",
            if up { "up" } else { "down" },
        ])
        .map(|_| ())
    }

    /// Upstream loss inside the ISP: it drops `percent` of the packets it forwards while
    /// the link stays up (100 = a silent failure, 0 = none).
    pub fn upstream_loss(&self, uplink: &str, percent: u32) -> Result<()> {
        let isp = self.ns(&format!("isp{}", self.k(uplink)));
        let _ = sh(&[
            "ip", "netns", "exec", &isp, "nft", "delete", "table", "inet", "isp_loss",
        ]);
        if percent == 0 {
            return Ok(());
        }
        let rule = if percent >= 100 {
            "drop".to_string()
        } else {
            format!("numgen random mod 100 < {percent} drop")
        };
        let script = format!(
            "add table inet isp_loss {{ chain loss {{ type filter hook forward priority 0; policy accept; {rule}; }}; }}"
        );
        sh(&["ip", "netns", "exec", &isp, "nft", &script]).map(|_| ())
    }

    /// Limits what the ISP sends down to the gateway to `rate` (tc tbf, e.g. "2mbit") with
    /// a deep queue, as a saturated DSL line has.
    pub fn shape(&self, uplink: &str, rate: &str) -> Result<()> {
        let isp = self.ns(&format!("isp{}", self.k(uplink)));
        sh(&[
            "ip", "netns", "exec", &isp, "tc", "qdisc", "replace", "dev", "cpe", "root", "tbf",
            "rate", rate, "burst", "32kbit", "latency", "300ms",
        ])
        .map(|_| ())
    }

    /// Client namespace `c<i>`: 198.19.0.(10+i), and 2001:db8:1::(10+i) when `v6`.
    pub fn add_client(&mut self, i: u32, v6: bool) -> Result<()> {
        let ns = self.add_ns(&format!("c{i}"))?;
        let gw = self.ns("gw");
        let port = format!("lan{i}");
        assert!(i < 200, "client numbers stay below 200");
        ip_batch(
            &gw,
            &[
                // Each new port's MAC is lower than the ones before: a bridge that followed
                // its lowest port would change address with every client (see LAN_IF).
                format!(
                    "link add {port} address 02:00:00:00:02:{:02x} type veth peer name eth0 netns {ns}",
                    255 - i
                ),
                format!("link set {port} master {LAN_IF}"),
                format!("link set {port} up"),
            ],
        )?;
        let mut cmds = vec![
            "link set lo up".into(),
            format!("link set eth0 address 02:00:00:00:01:{i:02x}"),
            "link set eth0 up".into(),
            format!("addr add {}/24 dev eth0", client_v4(i)),
            "route add default via 198.19.0.1".into(),
        ];
        if v6 {
            cmds.push(format!("addr add {}/64 dev eth0 nodad", client_v6(i)));
            cmds.push("route add default via 2001:db8:1::1".into());
        }
        ip_batch(&ns, &cmds)?;
        self.clients.insert(i, v6);
        Ok(())
    }

    /// Client `i` becomes a router on the LAN with `hosts` hosts behind it
    /// (10.20.0.1 ..= 10.20.0.<hosts>, addresses of its own loopback: their packets reach
    /// the gateway from the router's MAC, as a routed subnet's do), and the gateway routes
    /// 10.20.0.0/24 through it.
    pub fn add_lan_router(&mut self, i: u32, hosts: u8) -> Result<Vec<IpAddr>> {
        self.add_client(i, false)?;
        let ns = self.ns(&format!("c{i}"));
        let addrs: Vec<IpAddr> = (1..=hosts)
            .map(|h| IpAddr::V4(Ipv4Addr::new(10, 20, 0, h)))
            .collect();
        let cmds: Vec<String> = addrs
            .iter()
            .map(|a| format!("addr add {a}/32 dev lo"))
            .collect();
        ip_batch(&ns, &cmds)?;
        ip_batch(
            &self.ns("gw"),
            &[format!(
                "route add 10.20.0.0/24 via {} dev {LAN_IF}",
                client_v4(i)
            )],
        )?;
        Ok(addrs)
    }

    /// A new UDP flow from `src` in client `i`'s namespace to the echo server: the source
    /// address the internet host saw (`None`: unanswered after `tries`).
    pub fn echo_from(&self, i: u32, src: IpAddr, tries: u32) -> Result<Option<IpAddr>> {
        let s = in_netns(&self.ns(&format!("c{i}")), move || {
            let s = UdpSocket::bind(SocketAddr::new(src, 0))?;
            s.connect(server(src.is_ipv6()))?;
            s.set_read_timeout(Some(Duration::from_millis(300)))?;
            Ok::<_, std::io::Error>(s)
        })??;
        echo_source(&s, tries)
    }

    /// Removes a client's namespace and its LAN port.
    pub fn remove_client(&mut self, i: u32) -> Result<()> {
        let ns = self.ns(&format!("c{i}"));
        sh(&["ip", "netns", "del", &ns])?;
        self.namespaces.retain(|n| n != &ns);
        self.clients.remove(&i);
        Ok(())
    }

    /// Echo servers bound to the server addresses, so replies leave from the address the
    /// client talked to: UDP on `ECHO_PORT`, TCP (line by line) on `TCP_ECHO_PORT`.
    fn start_echo(&mut self, inet: &str) -> Result<()> {
        let bulk = in_netns(inet, || {
            std::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(SERVER4), BULK_PORT))
        })??;
        std::thread::spawn(move || {
            for conn in bulk.incoming() {
                let Ok(mut conn) = conn else { break };
                std::thread::spawn(move || {
                    use std::io::Write;
                    let zeros = [0u8; 65536];
                    while conn.write_all(&zeros).is_ok() {}
                });
            }
        });
        for addr in [server(false), server(true)] {
            let addr = SocketAddr::new(addr.ip(), TCP_ECHO_PORT);
            let listener = in_netns(inet, move || std::net::TcpListener::bind(addr))??;
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { break };
                    std::thread::spawn(move || {
                        use std::io::{BufRead, Write};
                        let peer = conn
                            .peer_addr()
                            .map(|a| a.ip().to_string())
                            .unwrap_or_default();
                        let mut w = conn.try_clone().expect("clone");
                        for line in std::io::BufReader::new(conn).lines().map_while(Result::ok) {
                            if writeln!(w, "{peer} {line}").is_err() {
                                break;
                            }
                        }
                    });
                }
            });
        }
        for addr in [server(false), server(true)] {
            udp_echo(in_netns(inet, move || UdpSocket::bind(addr))??);
        }
        Ok(())
    }

    /// A UDP echo (same reply as the main one: "<source seen> <payload>") on `addr` in the
    /// internet namespace; the address is added to its loopback unless it has it.
    pub fn serve_udp(&self, addr: SocketAddr) -> Result<()> {
        let inet = self.ns("inet");
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        let _ = ip_batch(
            &inet,
            &[format!("addr add {}/{prefix} dev lo nodad", addr.ip())],
        );
        udp_echo(in_netns(&inet, move || UdpSocket::bind(addr))??);
        Ok(())
    }

    /// One datagram of a new flow from client `i` to `to` (from source port `sport` and
    /// with DSCP `dscp` when given); the source address the far end saw, or `None` when
    /// `tries` attempts went unanswered.
    pub fn send_udp(
        &self,
        i: u32,
        to: SocketAddr,
        sport: Option<u16>,
        dscp: Option<u8>,
        tries: u32,
    ) -> Result<Option<IpAddr>> {
        use socket2::{Domain, Socket, Type};
        let ns = self.ns(&format!("c{i}"));
        let s = in_netns(&ns, move || -> std::io::Result<UdpSocket> {
            let domain = if to.is_ipv4() {
                Domain::IPV4
            } else {
                Domain::IPV6
            };
            let s = Socket::new(domain, Type::DGRAM, None)?;
            s.set_reuse_address(true)?;
            if let Some(d) = dscp {
                if to.is_ipv4() {
                    s.set_tos_v4((d as u32) << 2)?;
                } else {
                    s.set_tclass_v6((d as u32) << 2)?;
                }
            }
            let any: SocketAddr = if to.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, sport.unwrap_or(0)).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, sport.unwrap_or(0)).into()
            };
            s.bind(&any.into())?;
            s.connect(&to.into())?;
            Ok(s.into())
        })??;
        s.set_read_timeout(Some(Duration::from_millis(300)))?;
        let mut buf = [0u8; 2048];
        for n in 0..tries {
            s.send(format!("flow {n}").as_bytes())?;
            if let Ok(len) = retry_eintr(|| s.recv(&mut buf)) {
                let text = String::from_utf8_lossy(&buf[..len]);
                let seen = text.split(' ').next().unwrap_or_default();
                return Ok(Some(
                    seen.parse().with_context(|| format!("bad echo {text:?}"))?,
                ));
            }
        }
        Ok(None)
    }

    /// Like `send_udp`, but unanswered is an error; returns the uplink's name.
    pub fn udp_via(
        &self,
        i: u32,
        to: SocketAddr,
        sport: Option<u16>,
        dscp: Option<u8>,
    ) -> Result<String> {
        match self.send_udp(i, to, sport, dscp, 10)? {
            Some(seen) => self
                .uplink_of_source(seen)
                .with_context(|| format!("{seen} is no uplink's address")),
            None => bail!(
                "c{i} → {to}: no answer\n--- uplinkd log ---\n{}",
                self.log_tail(30)
            ),
        }
    }

    /// A UDP socket inside client `i`'s namespace, aimed at the internet host.
    pub fn client_socket(&self, i: u32, v6: bool) -> Result<UdpSocket> {
        let ns = self.ns(&format!("c{i}"));
        let s = in_netns(&ns, move || {
            UdpSocket::bind(if v6 { "[::]:0" } else { "0.0.0.0:0" })
        })??;
        s.connect(server(v6))?;
        s.set_read_timeout(Some(Duration::from_millis(300)))?;
        Ok(s)
    }

    /// Sends one datagram from a fresh socket (a new connection) and returns the source
    /// address the internet host saw, retrying up to `tries` times.
    pub fn probe(&self, i: u32, v6: bool, tries: u32) -> Result<IpAddr> {
        let s = self.client_socket(i, v6)?;
        let mut buf = [0u8; 2048];
        for n in 0..tries {
            s.send(format!("probe {n}").as_bytes())?;
            if let Ok(len) = retry_eintr(|| s.recv(&mut buf)) {
                let text = String::from_utf8_lossy(&buf[..len]);
                let seen = text.split(' ').next().unwrap_or_default();
                return seen.parse().with_context(|| format!("bad echo {text:?}"));
            }
        }
        bail!(
            "client c{i} ({}) got no answer after {tries} tries\n--- uplinkd log ---\n{}\n{}",
            if v6 { "IPv6" } else { "IPv4" },
            self.log_tail(40),
            self.post_mortem()
        )
    }

    /// Every client talks once (IPv4, and IPv6 where it has it), so the gateway learns its
    /// neighbour entries; then waits until uplinkd has persisted an assignment for each
    /// address, and returns the assignments.
    pub fn greet_clients(&self) -> Result<BTreeMap<IpAddr, String>> {
        let mut want = 0;
        for (&i, &v6) in &self.clients {
            for is6 in [false, true].into_iter().filter(|&x| v6 || !x) {
                self.probe(i, is6, 10)?;
                want += 1;
            }
        }
        self.wait_for(
            Duration::from_secs(10),
            &format!("{want} persisted assignments"),
            || Ok(self.assignments()?.len() == want),
        )?;
        self.assignments()
    }

    /// The agent's Prometheus metrics on `127.0.0.1:port`, series → value.
    pub fn scrape(&self, port: u16) -> Result<BTreeMap<String, f64>> {
        let text = self.gw(&["curl", "-sf", &format!("http://127.0.0.1:{port}/metrics")])?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect())
    }

    /// `uplinkd_uplink_up` of one uplink from the agent's default metrics port (1 usable,
    /// 0 not; `None` before the agent publishes it).
    pub fn uplink_up(&self, uplink: &str) -> Result<Option<f64>> {
        Ok(self
            .scrape(9477)?
            .get(&format!("uplinkd_uplink_up{{uplink=\"{uplink}\"}}"))
            .copied())
    }

    /// Uplink `name` as `uplinkctl -o json uplinks` shows it (null when it is not listed);
    /// needs the API in the config (`api_config`).
    pub fn uplink_json(&self, name: &str) -> Result<serde_json::Value> {
        let (code, out, err) = self.ctl("view", &["-o", "json", "uplinks"])?;
        anyhow::ensure!(code == 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .find(|u| u["name"] == name)
            .cloned()
            .unwrap_or_default())
    }

    /// Why `uplink` is down, from the API; `None` while it is not.
    pub fn down_reason(&self, uplink: &str) -> Result<Option<String>> {
        let u = self.uplink_json(uplink)?;
        Ok((u["state"] == "down")
            .then(|| u["down_reason"].as_str().unwrap_or_default().to_string()))
    }

    /// The HTTP status code of `url`, fetched from the gateway's namespace ("000" when
    /// nothing answers).
    pub fn http_status(&self, url: &str) -> Result<String> {
        self.gw(&["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url])
    }

    /// The uplink whose NAT address the internet host saw.
    /// Which uplink client `i`'s new connections leave by now.
    pub fn via(&self, i: u32) -> Result<String> {
        // Generous: a loaded CI machine runs a dozen labs at once.
        let seen = self.probe(i, false, 20)?;
        self.uplink_of_source(seen)
            .ok_or_else(|| anyhow::anyhow!("unknown source {seen}"))
    }

    /// Waits until client `i`'s new connections leave by `uplink`; returns how long that
    /// took.
    pub fn wait_via(&self, i: u32, uplink: &str, within: Duration) -> Result<Duration> {
        let t = Instant::now();
        self.wait_for(within, &format!("c{i} leaving via {uplink}"), || {
            Ok(self.via(i)? == uplink)
        })?;
        Ok(t.elapsed())
    }

    /// How many of `ct_entries(k)` client `i` (IPv4) opened.
    pub fn ct_count(&self, k: usize, i: u32) -> Result<usize> {
        let src = format!("src={} ", client_v4(i));
        Ok(self
            .ct_entries(k)?
            .iter()
            .filter(|e| e.starts_with(&src))
            .count())
    }

    /// Conntrack entries (IPv4) in the gateway whose mark carries uplink `k`'s id, as
    /// "src=… dst=… sport=… dport=…".
    pub fn ct_entries(&self, k: usize) -> Result<std::collections::BTreeSet<String>> {
        let out = self.gw(&[
            "conntrack",
            "-L",
            "-f",
            "ipv4",
            "-m",
            &format!("{:#x}/0x3f000000", (k as u32) << 24),
        ])?;
        Ok(out
            .lines()
            .filter(|l| l.contains("src="))
            .map(|l| {
                l.split_whitespace()
                    .filter(|w| {
                        w.starts_with("src=") || w.starts_with("sport=") || w.starts_with("dst=")
                    })
                    .take(4)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect())
    }

    pub fn uplink_of_source(&self, seen: IpAddr) -> Option<String> {
        uplink_by_address(&self.ns("gw"), &self.uplinks, seen)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("uplinkd.toml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Writes the agent config for this lab; `extra` is appended verbatim, `resync` sets
    /// agent.resync_interval and `idle` lan.client_idle_timeout.
    pub fn write_config(&self, resync: &str, idle: &str, extra: &str) -> Result<()> {
        let mut c = format!(
            // Tests read assignments from the state file: write it promptly.
            "[agent]\nname = \"{}\"\nstate_dir = \"{}\"\nresync_interval = \"{resync}\"\nstate_save_interval = \"200ms\"\n\n[lan]\ninterfaces = [\"{LAN_IF}\"]\nclient_idle_timeout = \"{idle}\"\n",
            self.prefix,
            self.state_dir().display()
        );
        for (k, u) in self.uplinks.iter().enumerate() {
            let k = k + 1;
            c += &format!(
                "\n[[uplink]]\nname = \"{}\"\ninterface = \"wan{k}\"\nweight = {}\n",
                u.name, u.weight
            );
            if !u.p2p {
                c += &format!("gateway = \"100.64.{k}.1\"\ngateway6 = \"2001:db8:100:{k}::1\"\n");
            }
            c += &u.extra;
        }
        c += extra;
        fs::write(self.config_path(), c)?;
        Ok(())
    }

    /// `write_config` with the lab's API (`api_config`) and immediate failback, then
    /// `extra`: for tests that read the uplinks' state from the API.
    pub fn write_api_config(&self, extra: &str) -> Result<()> {
        let api = self.api_config()?;
        self.write_config(
            "10s",
            "10m",
            &format!("{api}\n[failover]\nfailback_delay = \"0s\"\n{extra}"),
        )
    }

    /// Replaces `from` with `to` in the written config (e.g. a gateway by `"auto"`).
    pub fn edit_config(&self, from: &str, to: &str) -> Result<()> {
        let text = fs::read_to_string(self.config_path())?;
        anyhow::ensure!(text.contains(from), "the config has no {from:?}");
        fs::write(self.config_path(), text.replace(from, to))?;
        Ok(())
    }

    /// Makes a CA and certificates (agent for 127.0.0.1, operator `op`, viewer `view`) in
    /// `dir/certs` with uplinkctl, and returns the `[api]` config table for the agent.
    pub fn api_config(&self) -> Result<String> {
        let certs = self.dir.join("certs");
        make_certs(&certs)?;
        let d = certs.to_str().expect("utf-8 path");
        Ok(format!(
            "\n[api]\nlisten = \"127.0.0.1:7443\"\nca = \"{d}/ca.crt\"\ncert = \"{d}/gw.crt\"\nkey = \"{d}/gw.key\"\nhealth_listen = \"127.0.0.1:7444\"\n"
        ))
    }

    /// Runs uplinkctl in the gateway namespace against the agent, as `who` (a cert name in
    /// `dir/certs`): returns (exit code, stdout, stderr).
    pub fn ctl(&self, who: &str, args: &[&str]) -> Result<(i32, String, String)> {
        let certs = self.dir.join("certs");
        outcome(
            uplinkctl_in(&self.ns("gw"), &certs, &certs.join("ca.crt"), who)
                .args(["--gateway", "127.0.0.1:7443"])
                .args(args),
        )
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("uplinkd.log")
    }

    /// Starts uplinkd in the gateway namespace and waits for its first apply, and for its
    /// API to show the model when it has one.
    pub fn start_agent(&mut self) -> Result<()> {
        let before = self.spawn_agent()?;
        self.wait_for(Duration::from_secs(20), "uplinkd's first apply", || {
            Ok(fs::read_to_string(self.log_path())?
                .matches("initial apply done")
                .count()
                > before)
        })?;
        // The API refuses reads until the loop publishes its first model, which waits for
        // the state writer: a moment after that line. `/readyz` says when.
        let config = fs::read_to_string(self.config_path())?;
        if let Some(addr) = config
            .lines()
            .find_map(|l| l.trim().strip_prefix("health_listen = "))
        {
            let url = format!("http://{}/readyz", addr.trim_matches('"'));
            self.wait_for(
                Duration::from_secs(20),
                "uplinkd's first model shown",
                || {
                    Ok(!self
                        .gw(&["curl", "-s", &url])?
                        .starts_with("uplinkd is starting"))
                },
            )?;
        }
        Ok(())
    }

    /// Starts uplinkd in the gateway namespace without waiting for anything; returns how
    /// many "initial apply done" lines its log had before.
    pub fn spawn_agent(&mut self) -> Result<usize> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let before = fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .matches("initial apply done")
            .count();
        let mut cmd = match &self.container {
            Some(c) => c.command(&self.ns("gw"))?,
            None => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &self.ns("gw")])
                    .arg(uplinkd_bin())
                    .arg("--config")
                    .arg(self.config_path());
                cmd
            }
        };
        let child = cmd
            .env(
                "RUST_LOG",
                std::env::var("UPLINKD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.agent_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone()?)
            .stderr(log)
            .dies_with_spawner()
            .spawn()?;
        self.agent = Some(child);
        Ok(before)
    }

    /// Stops the agent with `signal` ("KILL", "TERM") and reaps it.
    pub fn stop_agent(&mut self, signal: &str) -> Result<()> {
        if let Some(mut child) = self.agent.take() {
            signal_child(&child, signal)?;
            child.wait()?;
        }
        Ok(())
    }

    pub fn signal_agent(&self, signal: &str) -> Result<()> {
        signal_child(self.agent.as_ref().context("agent not running")?, signal)
    }

    /// The agent's process id (`ip netns exec` execs uplinkd in place).
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// How many file descriptors the agent has open.
    pub fn agent_fds(&self) -> Result<usize> {
        let pid = self.agent_pid().context("agent not running")?;
        Ok(fs::read_dir(format!("/proc/{pid}/fd"))?.count())
    }

    /// Whether the agent process is still running.
    pub fn agent_running(&mut self) -> bool {
        self.agent
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Polls `cond` until it holds or `timeout` passes.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        mut cond: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let start = Instant::now();
        loop {
            if cond().unwrap_or(false) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "timed out after {timeout:?} waiting for {what}\n--- uplinkd log ---\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's log so far, to compare later with `log_since`.
    pub fn log_len(&self) -> usize {
        fs::read_to_string(self.log_path())
            .map(|t| t.len())
            .unwrap_or(0)
    }

    /// What the agent logged after `log_len` returned `mark`.
    pub fn log_since(&self, mark: usize) -> String {
        fs::read_to_string(self.log_path())
            .map(|t| t.get(mark..).unwrap_or_default().to_string())
            .unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The kernel state a lost flow is explained by: the gateway's connections, ruleset,
    /// rules and routes, and how many spoofed packets each ISP dropped.
    pub fn post_mortem(&self) -> String {
        let mut out = String::new();
        let mut show = |title: &str, r: Result<String>| {
            out.push_str(&format!("--- {title} ---\n"));
            out.push_str(&r.unwrap_or_else(|e| format!("({e:#})\n")));
        };
        show("gw conntrack -L", self.gw(&["conntrack", "-L"]));
        show("gw nft list ruleset", self.gw(&["nft", "list", "ruleset"]));
        show("gw ip rule", self.gw(&["ip", "rule"]));
        show("gw ip -6 rule", self.gw(&["ip", "-6", "rule"]));
        show(
            "gw routes",
            self.gw(&["ip", "route", "show", "table", "all"]),
        );
        show("gw neighbours", self.gw(&["ip", "neigh"]));
        show("gw links", self.gw(&["ip", "-br", "link"]));
        show("gw addresses", self.gw(&["ip", "-br", "addr"]));
        for k in 1..=self.uplinks.len() {
            let isp = self.ns(&format!("isp{k}"));
            show(
                &format!("isp{k} addresses and neighbours"),
                sh(&["ip", "-n", &isp, "-br", "addr"])
                    .and_then(|a| Ok(a + &sh(&["ip", "-n", &isp, "neigh"])?)),
            );
            show(
                &format!("isp{k} spoof guard"),
                sh(&[
                    "ip",
                    "netns",
                    "exec",
                    &isp,
                    "nft",
                    "list",
                    "table",
                    "inet",
                    "isp_guard",
                ]),
            );
        }
        out
    }

    /// Assignments as persisted by the agent: client address → home uplink.
    pub fn assignments(&self) -> Result<BTreeMap<IpAddr, String>> {
        read_assignments(&self.state_dir())
    }

    /// `uplinkd cleanup` with the lab's config, in the gateway namespace (as the
    /// package's prerm, or a reboot, leaves the kernel).
    pub fn uplinkd_cleanup(&self) -> Result<String> {
        self.gw(&[
            uplinkd_bin().to_str().unwrap_or_default(),
            "--config",
            self.config_path().to_str().unwrap_or_default(),
            "cleanup",
        ])
    }

    /// Runs a command inside the gateway namespace.
    pub fn gw(&self, args: &[&str]) -> Result<String> {
        let gw = self.ns("gw");
        let mut full = vec!["ip", "netns", "exec", gw.as_str()];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// The client addresses uplinkd put in the kernel for one family (`"client4"` or
    /// `"client6"`): address → its home chain.
    pub fn kernel_map(&self, family: &str) -> Result<BTreeMap<IpAddr, String>> {
        kernel_clients(&self.ns("gw"), family)
    }
}

/// The client addresses of `family` (`"client4"`, `"client6"`) in uplinkd's table in
/// namespace `ns`, from its per-uplink sets `client4.<uplink>`: address → `home_<uplink>`.
pub fn kernel_clients(ns: &str, family: &str) -> Result<BTreeMap<IpAddr, String>> {
    // A set listed while the kernel resizes its hash table (for about a second after a
    // commit of many elements) repeats some elements and misses others: the dump resumes
    // by count. A listing in which no set repeats an element is one state (one address in
    // two uplinks' sets is the kernel's, and shows).
    for _ in 0..10 {
        let out = sh(&[
            "ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet", "uplinkd",
        ])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let (mut m, mut repeated) = (BTreeMap::new(), false);
        for item in v["nftables"].as_array().into_iter().flatten() {
            let Some(uplink) = item["set"]["name"]
                .as_str()
                .and_then(|n| n.strip_prefix(family)?.strip_prefix('.'))
            else {
                continue;
            };
            let mut in_set = std::collections::BTreeSet::new();
            for e in item["set"]["elem"].as_array().into_iter().flatten() {
                if let Some(ip) = e.as_str() {
                    let ip: IpAddr = ip.parse()?;
                    repeated |= !in_set.insert(ip);
                    m.insert(ip, format!("home_{uplink}"));
                }
            }
        }
        if !repeated {
            return Ok(m);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    bail!("every listing of the {family} client sets in {ns} repeated an element of a set")
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.stop_agent("KILL");
        if std::thread::panicking() {
            eprintln!(
                "--- uplinkd log ({}) ---\n{}",
                self.log_path().display(),
                self.log_tail(60)
            );
        }
        // UPLINK_KEEP_NETNS=1 leaves a failed test's namespaces for a post-mortem (ip netns
        // del later).
        if std::thread::panicking() && std::env::var_os("UPLINK_KEEP_NETNS").is_some() {
            eprintln!("kept namespaces {}-*", self.prefix);
            return;
        }
        // Clients first: deleting a namespace destroys its veth pairs.
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if std::env::var_os("UPLINK_KEEP_LOGS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The assignments in `state.json`, with `state.journal` (the clients changed since the
/// file was last written whole) replayed over it as the agent does at start.
pub fn read_assignments(state_dir: &Path) -> Result<BTreeMap<IpAddr, String>> {
    let text = fs::read_to_string(state_dir.join("state.json"))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let mut clients: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for c in v["clients"].as_array().into_iter().flatten() {
        clients.insert(c["mac"].as_str().unwrap_or_default().to_string(), c.clone());
    }
    let journal = fs::read_to_string(state_dir.join("state.journal")).unwrap_or_default();
    // Only complete lines: the agent may be appending the last one.
    for line in journal.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        let l: serde_json::Value = serde_json::from_str(line)?;
        if let Some(mac) = l["del"].as_str() {
            clients.remove(mac);
        } else {
            let c = &l["set"];
            clients.insert(c["mac"].as_str().unwrap_or_default().to_string(), c.clone());
        }
    }
    let mut out = BTreeMap::new();
    for c in clients.values() {
        let home = c["home"].as_str().unwrap_or_default().to_string();
        for a in c["addresses"].as_array().into_iter().flatten() {
            out.insert(a["ip"].as_str().unwrap_or_default().parse()?, home.clone());
        }
    }
    Ok(out)
}

pub fn client_v4(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, 10 + i as u8)
}

pub fn client_v6(i: u32) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10 + i as u16)
}

/// The address the internet host sees for traffic masqueraded through uplink `k` (1-based).
pub fn uplink_source(k: usize, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x100, k as u16, 0, 0, 0, 2))
    } else {
        IpAddr::V4(Ipv4Addr::new(100, 64, k as u8, 2))
    }
}

/// The uplink whose address `seen` is: a lab's static one, or else whatever address
/// `wan<k>` has now (a DHCP lease, a renumbering, a redial).
pub fn uplink_by_address(gw_ns: &str, uplinks: &[UplinkSpec], seen: IpAddr) -> Option<String> {
    if let Some(k) = (1..=uplinks.len())
        .find(|k| seen == uplink_source(*k, false) || seen == uplink_source(*k, true))
    {
        return Some(uplinks[k - 1].name.clone());
    }
    let out = sh(&["ip", "-n", gw_ns, "-o", "addr", "show"]).ok()?;
    out.lines().find_map(|line| {
        let w: Vec<&str> = line.split_whitespace().collect();
        let addr: IpAddr = w.get(3)?.split('/').next()?.parse().ok()?;
        let k: usize = w.get(1)?.strip_prefix("wan")?.parse().ok()?;
        (addr == seen).then(|| uplinks.get(k.checked_sub(1)?).map(|u| u.name.clone()))?
    })
}

/// Sends on `s` (a socket connected to an echo server) up to `tries` times until answered;
/// the source address the far end saw, or `None` when nothing came back.
pub fn echo_source(s: &UdpSocket, tries: u32) -> Result<Option<IpAddr>> {
    let mut buf = [0u8; 512];
    for _ in 0..tries {
        s.send(b"echo")?;
        if let Ok(n) = retry_eintr(|| s.recv(&mut buf)) {
            let text = String::from_utf8_lossy(&buf[..n]);
            return Ok(text.split(' ').next().and_then(|a| a.parse().ok()));
        }
    }
    Ok(None)
}

pub fn server(v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::new(IpAddr::V6(SERVER6), ECHO_PORT)
    } else {
        SocketAddr::new(IpAddr::V4(SERVER4), ECHO_PORT)
    }
}

/// A steady UDP flow from one client to the internet host: one datagram every `every`,
/// each echoed back. One socket, so one conntrack entry for the whole flow.
pub struct UdpStream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<StreamResult>>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamResult {
    pub sent: u64,
    pub received: u64,
    /// The addresses the internet host saw, in order of first appearance.
    pub seen: Vec<IpAddr>,
}

impl UdpStream {
    pub fn start(lab: &Lab, client: u32, v6: bool, every: Duration) -> Result<UdpStream> {
        let sock = lab.client_socket(client, v6)?;
        sock.set_read_timeout(Some(Duration::from_millis(1)))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || -> Result<StreamResult> {
            let mut r = StreamResult {
                sent: 0,
                received: 0,
                seen: Vec::new(),
            };
            let mut buf = [0u8; 2048];
            let mut drain = |r: &mut StreamResult, until: Instant| {
                while Instant::now() < until {
                    if let Ok(n) = retry_eintr(|| sock.recv(&mut buf)) {
                        r.received += 1;
                        let text = String::from_utf8_lossy(&buf[..n]);
                        if let Some(ip) = text.split(' ').next().and_then(|s| s.parse().ok())
                            && !r.seen.contains(&ip)
                        {
                            r.seen.push(ip);
                        }
                    }
                }
            };
            while !flag.load(Ordering::SeqCst) {
                sock.send(format!("seq {}", r.sent).as_bytes())?;
                r.sent += 1;
                drain(&mut r, Instant::now() + every);
            }
            // Let the last answers arrive, also on a loaded CI machine.
            drain(&mut r, Instant::now() + Duration::from_millis(1500));
            Ok(r)
        });
        Ok(UdpStream {
            stop,
            thread: Some(thread),
        })
    }

    pub fn finish(mut self) -> Result<StreamResult> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("running")
            .join()
            .map_err(|_| anyhow::anyhow!("stream thread panicked"))?
    }
}

/// An established TCP connection from a client to the internet host's line echo.
pub struct TcpFlow {
    reader: std::io::BufReader<std::net::TcpStream>,
    writer: std::net::TcpStream,
}

impl TcpFlow {
    pub fn connect(lab: &Lab, client: u32) -> Result<TcpFlow> {
        let ns = lab.ns(&format!("c{client}"));
        let stream = in_netns(&ns, || {
            std::net::TcpStream::connect_timeout(
                &SocketAddr::new(IpAddr::V4(SERVER4), TCP_ECHO_PORT),
                Duration::from_secs(3),
            )
        })??;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(TcpFlow {
            reader: std::io::BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// One round trip on the same connection; returns the address the internet host saw.
    pub fn exchange(&mut self) -> Result<IpAddr> {
        use std::io::{BufRead, Write};
        writeln!(self.writer, "ping")?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        line.split(' ')
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("bad TCP echo {line:?}"))
    }
}

/// Answers every datagram on `sock` with "<source seen> <payload>", in a thread.
pub fn udp_echo(sock: UdpSocket) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = retry_eintr(|| sock.recv_from(&mut buf)) {
            let mut reply = format!("{} ", from.ip()).into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = sock.send_to(&reply, from);
        }
    });
}

/// Packets counted by every counter of nft chain `family table chain` in namespace `ns`.
pub fn nft_chain_packets(ns: &str, family: &str, table: &str, chain: &str) -> Result<u64> {
    let out = sh(&[
        "ip", "netns", "exec", ns, "nft", "-j", "list", "chain", family, table, chain,
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|i| i["rule"]["expr"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["counter"]["packets"].as_u64())
        .sum())
}

/// A bare namespace, deleted on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Result<Netns> {
        let name = format!(
            "ul{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        sh(&["ip", "netns", "add", &name])?;
        Ok(Netns(name))
    }

    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["ip", "netns", "exec", self.0.as_str()];
        full.extend_from_slice(args);
        sh(&full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Many agents (up to 1,000), each in its own gateway namespace, reachable from one
/// management namespace over a bridge (198.18.248.0/22); for uplinkctl's fleet commands.
///
/// The kernel's neighbour table is global (`gc_thresh3` = 1,024 entries across all
/// namespaces), and a fleet needs two entries per gateway: both ends get permanent entries,
/// which the limit does not count, from the fixed MAC addresses.
pub struct Fleet {
    pub mgmt: Netns,
    pub gateways: Vec<Netns>,
    pub agents: Vec<Child>,
    pub dir: PathBuf,
}

impl Fleet {
    pub const MAX: usize = 1000;
    const MGMT_MAC: &str = "02:00:00:00:fa:01";

    /// Gateway `i`'s management address (from 198.18.248.10).
    pub fn address(i: usize) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 248, 10)) + i as u32)
    }

    pub fn build(tag: &str, n: usize) -> Result<Fleet> {
        assert!(n <= Self::MAX, "at most {} gateways", Self::MAX);
        let mgmt = Netns::new(&format!("{tag}m"))?;
        let dir = std::env::temp_dir().join(&mgmt.0);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        ip_batch(
            &mgmt.0,
            &[
                "link set lo up".into(),
                // Fixed, as the lab's LAN bridge: adding gateways must not change its MAC.
                format!("link add br0 address {} type bridge", Self::MGMT_MAC),
                "link set br0 up".into(),
                "addr add 198.18.248.1/22 dev br0".into(),
            ],
        )?;
        let certs = dir.join("certs");
        let ctl = uplinkctl_bin();
        let (ctl, d) = (ctl.to_str().expect("utf-8"), certs.to_str().expect("utf-8"));
        sh(&[ctl, "certs", "init", "--dir", d])?;
        let mut issue = vec![ctl, "certs", "issue", "--dir", d, "--agent", "gw"];
        let ips: Vec<String> = (0..n).map(|i| Self::address(i).to_string()).collect();
        for ip in &ips {
            issue.extend(["--san", ip.as_str()]);
        }
        sh(&issue)?;
        sh(&[ctl, "certs", "issue", "--dir", d, "--operator", "op"])?;
        let mut fleet = Fleet {
            mgmt,
            gateways: Vec::new(),
            agents: Vec::new(),
            dir,
        };
        let mut inventory = String::new();
        for (i, ip) in ips.iter().enumerate() {
            let gw = Netns::new(&format!("{tag}g{i}"))?;
            let mac = format!("02:00:c6:12:{:02x}:{:02x}", i >> 8, i & 0xff);
            ip_batch(
                &fleet.mgmt.0,
                &[
                    format!("link add m{i} type veth peer name mgmt netns {}", gw.0),
                    format!("link set m{i} master br0"),
                    format!("link set m{i} up"),
                    format!("neigh replace {ip} lladdr {mac} dev br0 nud permanent"),
                ],
            )?;
            ip_batch(
                &gw.0,
                &[
                    "link set lo up".into(),
                    format!("link set mgmt address {mac}"),
                    "link set mgmt up".into(),
                    format!("addr add {ip}/22 dev mgmt"),
                    format!(
                        "neigh replace 198.18.248.1 lladdr {} dev mgmt nud permanent",
                        Self::MGMT_MAC
                    ),
                    "link add br-lan type bridge".into(),
                ],
            )?;
            let state = fleet.dir.join(format!("state{i}"));
            let config = fleet.dir.join(format!("gw{i}.toml"));
            fs::write(
                &config,
                format!(
                    "[agent]\nname = \"gw-{i:03}\"\nstate_dir = \"{}\"\n[lan]\ninterfaces = [\"br-lan\"]\n[[uplink]]\nname = \"isp1\"\ninterface = \"wan1\"\ngateway = \"100.64.1.1\"\n[[uplink]]\nname = \"isp2\"\ninterface = \"wan2\"\ngateway = \"100.64.2.1\"\n[[set]]\nname = \"saas\"\n[api]\nlisten = \"{ip}:7443\"\nca = \"{d}/ca.crt\"\ncert = \"{d}/gw.crt\"\nkey = \"{d}/gw.key\"\nhealth_listen = \"{ip}:7444\"\n",
                    state.display()
                ),
            )?;
            fleet.gateways.push(gw);
            let child = fleet.spawn_agent(i)?;
            fleet.agents.push(child);
            inventory += &format!(
                "[[gateway]]\nname = \"gw-{i:03}\"\naddress = \"{ip}:7443\"\nlabels = {{ site = \"{}\" }}\n\n",
                if i % 2 == 0 { "even" } else { "odd" }
            );
        }
        fs::write(fleet.dir.join("inventory.toml"), inventory)?;
        for i in 0..n {
            fleet.wait_serving(i, 1)?;
        }
        Ok(fleet)
    }

    /// Starts gateway `i`'s agent (its log appended to).
    fn spawn_agent(&self, i: usize) -> Result<Child> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("gw{i}.log")))?;
        Ok(Command::new("ip")
            .args(["netns", "exec", &self.gateways[i].0])
            .arg(uplinkd_bin())
            .arg("--config")
            .arg(self.dir.join(format!("gw{i}.toml")))
            .stdout(log.try_clone()?)
            .stderr(log)
            .dies_with_spawner()
            .spawn()?)
    }

    /// Waits until gateway `i`'s log says its API serves for the `nth` time, and then
    /// until its `/readyz` no longer says it is starting (reads are refused until its first
    /// model is shown).
    fn wait_serving(&self, i: usize, nth: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let log = || fs::read_to_string(self.dir.join(format!("gw{i}.log")));
        while log()?.matches("API serving").count() < nth {
            if Instant::now() > deadline {
                bail!("agent {i} did not start: {}", log()?);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let addr = std::net::SocketAddr::from((Self::address(i), 7444));
        loop {
            let conn = in_netns(&self.gateways[i].0, move || {
                std::net::TcpStream::connect(addr)
            })?;
            let mut body = String::new();
            if let Ok(mut c) = conn {
                std::io::Write::write_all(&mut c, b"GET /readyz HTTP/1.0\r\n\r\n")?;
                std::io::Read::read_to_string(&mut c, &mut body)?;
            }
            if body.starts_with("HTTP/") && !body.contains("uplinkd is starting") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("agent {i} still starting: {body}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops gateway `i`'s agent (SIGTERM) and starts it again; waits until it serves.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        signal_child(&self.agents[i], "TERM")?;
        self.agents[i].wait()?;
        let started = fs::read_to_string(self.dir.join(format!("gw{i}.log")))?
            .matches("API serving")
            .count();
        self.agents[i] = self.spawn_agent(i)?;
        self.wait_serving(i, started + 1)
    }

    /// Adds an unreachable gateway (an address nobody has) to the inventory.
    pub fn add_unreachable(&self) -> Result<()> {
        let mut inv = fs::read_to_string(self.dir.join("inventory.toml"))?;
        inv += "[[gateway]]\nname = \"gw-dead\"\naddress = \"198.18.251.254:7443\"\nlabels = { site = \"dead\" }\n";
        fs::write(self.dir.join("inventory.toml"), inv)?;
        Ok(())
    }

    /// Runs uplinkctl in the management namespace with the fleet's inventory.
    pub fn ctl(&self, args: &[&str]) -> Result<(i32, String, String)> {
        let certs = self.dir.join("certs");
        outcome(
            uplinkctl_in(&self.mgmt.0, &certs, &certs.join("ca.crt"), "op")
                .arg("--inventory")
                .arg(self.dir.join("inventory.toml"))
                .args(args),
        )
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = a.kill();
            let _ = a.wait();
        }
        self.gateways.clear();
        if std::env::var_os("UPLINK_KEEP_LOGS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
