//! API commands, served by the agent loop: reads from the model, writes applied to the
//! kernel before they answer.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use uplink_api::v1;

use super::Agent;
use crate::api::{ApiError, Command, view};
use crate::model::failover::{EventKind, LogEntry};
use crate::model::now_millis;

impl Agent {
    /// Serves one API command. Writes apply to the kernel before they answer.
    pub(super) async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Status(reply) => {
                let s = v1::AgentStatus {
                    name: self.config.agent.name.clone(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    uptime_seconds: self.started.elapsed().as_secs(),
                    clients_per_uplink: self
                        .config
                        .uplinks
                        .iter()
                        .zip(self.model.counts())
                        .map(|(u, n)| (u.name.clone(), *n as u64))
                        .collect(),
                    clients: self.model.clients().len() as u64,
                    config_generation: self.generation,
                    in_sync: self.in_sync.load(Ordering::SeqCst),
                    overrides: self.model.overrides.len() as u64,
                };
                let _ = reply.send(Ok(s));
            }
            Command::Uplinks(reply) => {
                let carried = view::carried(&self.config, &self.model);
                let _ = reply.send(Ok((0..self.config.uplinks.len())
                    .map(|i| view::uplink(&self.config, &self.model, &carried, i, None))
                    .collect()));
            }
            Command::Clients {
                uplink,
                after,
                limit,
                reply,
            } => {
                if let Some(u) = &uplink
                    && self.model.uplink(u).is_none()
                {
                    let _ = reply.send(Err(self.unknown_uplink(u)));
                    return;
                }
                // The page token is the last MAC of the previous page: the next page starts
                // right after it, so a page costs its own size, not the whole client list.
                let start = match after {
                    None => std::ops::Bound::Unbounded,
                    Some(mac) => std::ops::Bound::Excluded(mac),
                };
                let mut out = Vec::new();
                let mut next = None;
                for c in self
                    .model
                    .clients()
                    .range((start, std::ops::Bound::Unbounded))
                    .map(|(_, c)| c)
                {
                    let v = view::client(&self.config, &self.model, c);
                    if uplink
                        .as_ref()
                        .is_some_and(|u| &v.home_uplink != u && &v.current_uplink != u)
                    {
                        continue;
                    }
                    if out.len() == limit {
                        next = out.last().map(|l: &v1::Client| l.mac.clone());
                        break;
                    }
                    out.push(v);
                }
                let _ = reply.send(Ok((out, next)));
            }
            Command::Client { key, reply } => {
                let found = match key.parse::<IpAddr>() {
                    Ok(ip) => self.model.client_by_addr(&ip),
                    Err(_) => key
                        .parse::<crate::model::Mac>()
                        .ok()
                        .and_then(|m| self.model.clients().get(&m)),
                };
                let r = match found {
                    Some(c) => Ok(view::client(&self.config, &self.model, c)),
                    None if key.parse::<IpAddr>().is_err()
                        && key.parse::<crate::model::Mac>().is_err() =>
                    {
                        Err(ApiError::InvalidArgument(format!(
                            "client: {key:?} is neither an IP address nor a MAC address"
                        )))
                    }
                    None => Err(ApiError::NotFound(format!(
                        "no client {key} on this gateway"
                    ))),
                };
                let _ = reply.send(r);
            }
            Command::Overrides(reply) => {
                let _ = reply.send(Ok(self
                    .model
                    .overrides
                    .iter()
                    .map(|(ip, o)| v1::Override {
                        client: ip.to_string(),
                        uplink: o.uplink.clone(),
                        expires_at_ms: o.until.unwrap_or(0),
                    })
                    .collect()));
            }
            Command::SetOverride {
                ip,
                uplink,
                ttl,
                reply,
            } => {
                let r = self.set_override(ip, uplink, ttl).await;
                let _ = reply.send(r);
            }
            Command::ClearOverride { ip, reply } => {
                let r = if self.model.overrides.remove(&ip).is_none() {
                    Err(ApiError::NotFound(format!("no override for {ip}")))
                } else {
                    self.record(vec![LogEntry {
                        at: now_millis(),
                        uplink: String::new(),
                        kind: EventKind::Override,
                        cause: format!("override of {ip} cleared"),
                        clients_moved: 1,
                    }]);
                    self.apply_for_api().await
                };
                let _ = reply.send(r);
            }
            Command::Drain {
                uplink,
                drain,
                reply,
            } => {
                let r = self.drain(&uplink, drain).await;
                let _ = reply.send(r);
            }
            Command::Failback { uplink, reply } => {
                let r = match self.model.uplinks.iter().position(|u| u.name == uplink) {
                    None => Err(self.unknown_uplink(&uplink)),
                    Some(i) => match self.model.failback(i, Instant::now()) {
                        None => Err(ApiError::FailedPrecondition(format!(
                            "uplink {uplink} is not failed over or not usable yet; nothing to fail back"
                        ))),
                        Some(e) => {
                            self.record(vec![e]);
                            self.apply_for_api().await.map(|()| self.uplink_view(i))
                        }
                    },
                };
                let _ = reply.send(r);
            }
            Command::Reload(reply) => {
                let r = self.reload().await.map_err(ApiError::FailedPrecondition);
                let _ = reply.send(r);
            }
            Command::Watch(reply) => {
                let history = self.events.recent().map(view::event).collect();
                let _ = reply.send(Ok((history, self.event_tx.subscribe())));
            }
        }
    }

    fn unknown_uplink(&self, name: &str) -> ApiError {
        let known: Vec<&str> = self
            .config
            .uplinks
            .iter()
            .map(|u| u.name.as_str())
            .collect();
        ApiError::NotFound(format!(
            "unknown uplink {name:?}; this gateway has {}",
            known.join(", ")
        ))
    }

    async fn apply_for_api(&mut self) -> Result<(), ApiError> {
        let report = self.apply(crate::dataplane::ReadBack::Cache).await;
        self.save_decisions();
        self.publish_metrics();
        match report.errors.first() {
            None => Ok(()),
            Some(e) => Err(ApiError::Internal(format!(
                "the change is recorded but the kernel refused it (retrying): {e}"
            ))),
        }
    }

    async fn set_override(
        &mut self,
        ip: IpAddr,
        uplink: String,
        ttl: Option<Duration>,
    ) -> Result<v1::Override, ApiError> {
        if self.model.uplink(&uplink).is_none() {
            return Err(self.unknown_uplink(&uplink));
        }
        if self.model.client_by_addr(&ip).is_none() {
            return Err(ApiError::NotFound(format!(
                "no client with address {ip} on this gateway (it appears once it talks)"
            )));
        }
        let until = ttl.map(|t| now_millis() + t.as_millis() as u64);
        self.model.overrides.insert(
            ip,
            crate::model::Override {
                uplink: uplink.clone(),
                until,
            },
        );
        let cause = match ttl {
            Some(t) => format!(
                "{ip} pinned to {uplink} for {}",
                humantime::format_duration(t)
            ),
            None => format!("{ip} pinned to {uplink}"),
        };
        self.record(vec![LogEntry {
            at: now_millis(),
            uplink: uplink.clone(),
            kind: EventKind::Override,
            cause,
            clients_moved: 1,
        }]);
        self.apply_for_api().await?;
        Ok(v1::Override {
            client: ip.to_string(),
            uplink,
            expires_at_ms: until.unwrap_or(0),
        })
    }

    async fn drain(&mut self, uplink: &str, drain: bool) -> Result<v1::Uplink, ApiError> {
        let Some(i) = self.model.uplinks.iter().position(|u| u.name == uplink) else {
            return Err(self.unknown_uplink(uplink));
        };
        match self.model.set_drained(i, drain) {
            Err(why) => return Err(ApiError::FailedPrecondition(why)),
            Ok(None) => {}
            Ok(Some(entry)) => {
                self.record(vec![entry]);
                self.apply_for_api().await?;
            }
        }
        Ok(self.uplink_view(i))
    }

    /// An uplink as the API shows it, without traffic counters (the API reads those).
    fn uplink_view(&self, i: usize) -> v1::Uplink {
        let carried = view::carried(&self.config, &self.model);
        view::uplink(&self.config, &self.model, &carried, i, None)
    }
}
