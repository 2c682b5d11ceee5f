//! Real peer software in the lab: dnsmasq as an ISP's DHCP server (and router-advert
//! source) or as a resolver, a minimal DNS client, and real DHCP clients in the gateway namespace whose scripts are the test's
//! own (they touch only the uplink's address and default route, never the host's files).

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

use crate::{Lab, ip_batch, sh};

/// A child process killed and reaped when dropped (before the lab's namespaces go).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub fn signal(&self, signal: &str) -> Result<()> {
        crate::signal_child(&self.0, signal)
    }
}

/// Where the client's script puts the default route: the main table (what DHCP clients do
/// by default) or a table of the operator's that uplinkd reads but does not own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteTable {
    Main,
    Table(u32),
}

impl RouteTable {
    fn arg(self) -> String {
        match self {
            RouteTable::Main => String::new(),
            RouteTable::Table(t) => format!("table {t}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// busybox udhcpc: SIGUSR1 renews.
    Udhcpc,
    /// isc-dhcp-client.
    Dhclient,
}

fn routes_log(dir: &std::path::Path) -> PathBuf {
    dir.join("routes.log")
}

/// The subnet an ISP hands out: `100.64.<net>.0/24`, its router `.1`, leases `.50`–`.99`.
pub fn router(net: u8) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, net, 1)
}

impl Lab {
    /// Turns uplink `k` (1-based) into a DHCP uplink: the gateway's static IPv4 address
    /// goes, and the ISP accepts any CGNAT source from its customer (a renumbered one too).
    pub fn dhcp_uplink(&self, k: usize) -> Result<()> {
        self.gw(&["ip", "-4", "addr", "flush", "dev", &format!("wan{k}")])?;
        let isp = self.ns(&format!("isp{k}"));
        sh(&[
            "ip",
            "netns",
            "exec",
            &isp,
            "nft",
            "delete table inet isp_guard",
        ])?;
        Ok(())
    }

    /// Starts a dnsmasq as a resolver in namespace `ns` (no config file, no resolv.conf,
    /// no hosts file; its pid file in the lab's directory), with `args`.
    pub fn resolver(&self, ns: &str, args: &[&str]) -> Result<Proc> {
        // Each its own pid file, also when two start before either has written one.
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let pid = self.dir.join(format!("dnsmasq-resolver-{n}.pid"));
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "dnsmasq", "--keep-in-foreground"])
            .args([
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--conf-file=/dev/null",
            ])
            .arg(format!("--pid-file={}", pid.display()))
            .args(args)
            .stderr(Stdio::null())
            .spawn()
            .context("dnsmasq (Debian dnsmasq-base) must be installed")?;
        Ok(Proc(child))
    }

    /// A minimal DNS A query over UDP from client `i` to `server`; the first A record.
    pub fn resolve(&self, i: u32, server: SocketAddr, name: &str) -> Result<Ipv4Addr> {
        let q = uplinkd::health::probe::dns_query(0x1234, name);
        let s = crate::in_netns(&self.ns(&format!("c{i}")), || {
            std::net::UdpSocket::bind("0.0.0.0:0")
        })??;
        s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
        s.send_to(&q, server)?;
        let mut buf = [0u8; 512];
        let n = crate::retry_eintr(|| s.recv(&mut buf))?;
        let ancount = u16::from_be_bytes([buf[6], buf[7]]);
        anyhow::ensure!(
            buf[3] & 0x0f == 0 && ancount > 0,
            "no answer for {name}: {:?}",
            &buf[..n]
        );
        // The answer's RDATA is the last four bytes (one A record, no other sections).
        Ok(Ipv4Addr::new(
            buf[n - 4],
            buf[n - 3],
            buf[n - 2],
            buf[n - 1],
        ))
    }

    /// Starts dnsmasq in ISP `k` handing out `100.64.<net>.0/24` with leases of `lease`
    /// (dnsmasq's minimum is 2m). The ISP side gets the router address and the internet
    /// host a route back to the subnet. `extra` lines are appended to its config.
    pub fn dhcp_server(&self, k: usize, net: u8, lease: &str, extra: &str) -> Result<Proc> {
        let isp = self.ns(&format!("isp{k}"));
        let _ = ip_batch(&isp, &[format!("addr add {}/24 dev cpe", router(net))]);
        let _ = ip_batch(
            &self.ns("inet"),
            &[format!("route add 100.64.{net}.0/24 via 198.18.{k}.1")],
        );
        let dir = self.dir.join(format!("dhcp-isp{k}"));
        fs::create_dir_all(&dir)?;
        let conf = dir.join(format!("dnsmasq-{net}.conf"));
        fs::write(
            &conf,
            format!(
                "port=0\ninterface=cpe\nbind-interfaces\nuser=root\ndhcp-authoritative\nno-ping\n\
                 dhcp-range=100.64.{net}.50,100.64.{net}.99,255.255.255.0,{lease}\n\
                 dhcp-option=option:router,{}\ndhcp-leasefile={}\npid-file={}\n{extra}",
                router(net),
                dir.join("leases").display(),
                dir.join("dnsmasq.pid").display(),
            ),
        )?;
        let child = Command::new("ip")
            .args(["netns", "exec", &isp, "dnsmasq", "--keep-in-foreground"])
            .arg(format!("--conf-file={}", conf.display()))
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("dnsmasq.log"))?)
            .spawn()
            .context("dnsmasq (Debian dnsmasq-base) must be installed")?;
        Ok(Proc(child))
    }

    /// Starts a DHCP client for `wan<k>` in the gateway namespace with a script of the
    /// test's own that sets the address and the default route in `table`.
    pub fn dhcp_client(&self, k: usize, kind: ClientKind, table: RouteTable) -> Result<Proc> {
        let iface = format!("wan{k}");
        let dir = self.dir.join(format!("dhcp-wan{k}"));
        fs::create_dir_all(&dir)?;
        let t = table.arg();
        let routes = routes_log(&dir).display().to_string();
        let script = dir.join("script");
        let body = match kind {
            ClientKind::Udhcpc => format!(
                r#"#!/bin/sh
# udhcpc's events; only this uplink's address and default route are touched.
case "$1" in
  deconfig)
    ip -4 addr flush dev "$interface"
    ip -4 route del default dev "$interface" {t} 2>/dev/null ;;
  bound|renew)
    if ! ip -4 -o addr show dev "$interface" | grep -q " $ip/$mask "; then
      ip -4 addr flush dev "$interface"
      ip addr add "$ip/$mask" dev "$interface"
    fi
    ip route replace default via "${{router%% *}}" dev "$interface" {t}
    date +%s.%N >> "{routes}" ;;
esac
exit 0
"#
            ),
            ClientKind::Dhclient => format!(
                r#"#!/bin/sh
# dhclient's reasons; only this uplink's address and default route are touched (never
# /etc/resolv.conf, which dhclient's own script would rewrite).
case "$reason" in
  PREINIT) ip link set dev "$interface" up ;;
  BOUND|RENEW|REBIND|REBOOT)
    if [ -n "$old_ip_address" ] && [ "$old_ip_address" != "$new_ip_address" ]; then
      ip -4 addr flush dev "$interface"
    fi
    ip -4 -o addr show dev "$interface" | grep -q " $new_ip_address/" ||
      ip addr add "$new_ip_address/$new_subnet_mask" dev "$interface"
    ip route replace default via "${{new_routers%% *}}" dev "$interface" {t}
    date +%s.%N >> "{routes}" ;;
  EXPIRE|FAIL|RELEASE|STOP)
    ip -4 addr flush dev "$interface"
    ip -4 route del default dev "$interface" {t} 2>/dev/null ;;
esac
exit 0
"#
            ),
        };
        fs::write(&script, body)?;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755))?;
        let log = fs::File::create(dir.join("client.log"))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns("gw")]);
        match kind {
            ClientKind::Udhcpc => {
                // Foreground; on failure retry at once, forever (a lease may come late).
                cmd.args([
                    "udhcpc", "-f", "-i", &iface, "-t", "3", "-T", "1", "-A", "1",
                ])
                .arg("-s")
                .arg(&script);
            }
            ClientKind::Dhclient => {
                let conf = dir.join("dhclient.conf");
                // Retry quickly: the default waits five minutes after a failed attempt.
                fs::write(
                    &conf,
                    "timeout 5;\nretry 1;\ninitial-interval 1;\nbackoff-cutoff 1;\nselect-timeout 0;\n",
                )?;
                cmd.args(["dhclient", "-d", "-4"])
                    .arg("-cf")
                    .arg(&conf)
                    .arg("-sf")
                    .arg(&script)
                    .arg("-pf")
                    .arg(dir.join("dhclient.pid"))
                    .arg("-lf")
                    .arg(dir.join("dhclient.leases"))
                    .arg(&iface);
            }
        }
        let child = cmd
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("{kind:?} must be installed"))?;
        Ok(Proc(child))
    }

    /// The IPv4 address on `wan<k>`, once the client has one.
    pub fn wan_addr(&self, k: usize) -> Result<Option<Ipv4Addr>> {
        let out = self.gw(&["ip", "-4", "-o", "addr", "show", "dev", &format!("wan{k}")])?;
        Ok(out
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok()))
    }

    /// When the client's script installed each default route (Unix seconds), oldest first.
    pub fn route_times(&self, k: usize) -> Vec<f64> {
        fs::read_to_string(routes_log(&self.dir.join(format!("dhcp-wan{k}"))))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Where a client's log and scripts live, for failure messages.
    pub fn dhcp_log(&self, k: usize) -> String {
        let p: PathBuf = self.dir.join(format!("dhcp-wan{k}")).join("client.log");
        fs::read_to_string(p).unwrap_or_default()
    }
}
