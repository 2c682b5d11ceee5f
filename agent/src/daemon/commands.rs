//! API writes, served by the agent loop; each answers once its change is in the kernel.
//! Reads are served from the snapshot (`api::snapshot`) without the loop.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use uplink_api::v1;

use tokio::sync::oneshot;

use super::Agent;
use crate::api::{ApiError, Command, view};
use crate::dataplane::ReadBack;
use crate::model::failover::PinRefused;
use crate::model::now_millis;

impl Agent {
    /// Serves one API command. Writes answer once their change is in the kernel; the loop
    /// goes on meanwhile.
    pub(super) async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::SetOverride {
                ip,
                uplink,
                ttl,
                reply,
            } => {
                let r = self.set_override(ip, uplink, ttl);
                self.answer_when_applied(reply, r, true);
            }
            Command::ClearOverride { ip, reply } => {
                let r = match self.model.unpin(ip, now_millis()) {
                    None => Err(ApiError::NotFound(format!("no override for {ip}"))),
                    Some(entry) => {
                        self.record(vec![entry]);
                        Ok(())
                    }
                };
                self.answer_when_applied(reply, r, true);
            }
            Command::Drain {
                uplink,
                drain,
                reply,
            } => match self.drain(&uplink, drain) {
                Ok((view, changed)) => self.answer_when_applied(reply, Ok(view), changed),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Failback { uplink, reply } => {
                let r = match self.model.uplinks.iter().position(|u| u.name == uplink) {
                    None => Err(self.unknown_uplink(&uplink)),
                    Some(i) => match self.model.failback(i, Instant::now()) {
                        None => Err(ApiError::FailedPrecondition(format!(
                            "uplink {uplink} is not failed over or not usable yet; nothing to fail back"
                        ))),
                        Some(e) => {
                            self.record(vec![e]);
                            Ok(self.uplink_view(i))
                        }
                    },
                };
                self.answer_when_applied(reply, r, true);
            }
            Command::Reload(reply) => {
                // The reload asked for its apply; the answer waits for it.
                let r = self.reload().await.map_err(ApiError::FailedPrecondition);
                let changed = r.is_ok();
                self.answer_when_applied(reply, r, changed);
            }
            Command::UpdateSet {
                set,
                add,
                del,
                reply,
            } => {
                let r = self.update_set(&set, &add, &del);
                self.answer_when_applied(reply, r, true);
            }
            Command::Quota {
                uplink,
                bytes,
                reply,
            } => {
                if !self.config.uplinks.iter().any(|u| u.name == uplink) {
                    let _ = reply.send(Err(self.unknown_uplink(&uplink)));
                    return;
                }
                self.usage.request(super::usage::QuotaRequest {
                    uplink,
                    op: bytes.map_or(super::usage::QuotaOp::Reset, super::usage::QuotaOp::Set),
                    reply,
                });
            }
            Command::Watch(reply) => {
                let history = self.events.recent().map(view::event).collect();
                let _ = reply.send(Ok((history, self.event_tx.subscribe())));
            }
        }
    }

    /// Answers an API write once the apply that carries its change is answered by the
    /// executor; an error, or a write that changed nothing, answers at once.
    pub(super) fn answer_when_applied<T: Send + 'static>(
        &mut self,
        reply: oneshot::Sender<Result<T, ApiError>>,
        r: Result<T, ApiError>,
        changed: bool,
    ) {
        let value = match r {
            Ok(v) if changed => v,
            r => {
                let _ = reply.send(r);
                return;
            }
        };
        self.request_apply(ReadBack::Cache);
        self.schedule.wait(Box::new(move |applied| {
            let _ = reply.send(applied.map(|()| value).map_err(|e| {
                ApiError::Internal(format!(
                    "the change is recorded but the kernel refused it (retrying): {e}"
                ))
            }));
        }));
    }

    pub(super) fn unknown_uplink(&self, name: &str) -> ApiError {
        crate::api::snapshot::unknown_uplink(&self.config, name)
    }

    fn set_override(
        &mut self,
        ip: IpAddr,
        uplink: String,
        ttl: Option<Duration>,
    ) -> Result<v1::Override, ApiError> {
        let (o, entry) = match self.model.pin(ip, &uplink, ttl, now_millis()) {
            Ok(r) => r,
            Err(PinRefused::UnknownUplink) => return Err(self.unknown_uplink(&uplink)),
            Err(PinRefused::UnknownClient) => {
                return Err(ApiError::NotFound(format!(
                    "no client with address {ip} on this gateway (it appears once it talks)"
                )));
            }
        };
        self.record(vec![entry]);
        Ok(v1::Override {
            client: ip.to_string(),
            uplink: o.uplink,
            expires_at_ms: o.until.unwrap_or(0),
        })
    }

    /// The uplink as it is now, and whether anything changed.
    fn drain(&mut self, uplink: &str, drain: bool) -> Result<(v1::Uplink, bool), ApiError> {
        let Some(i) = self.model.uplinks.iter().position(|u| u.name == uplink) else {
            return Err(self.unknown_uplink(uplink));
        };
        let changed = match self.model.set_drained(i, drain) {
            Err(why) => return Err(ApiError::FailedPrecondition(why)),
            Ok(None) => false,
            Ok(Some(entry)) => {
                self.record(vec![entry]);
                true
            }
        };
        Ok((self.uplink_view(i), changed))
    }

    fn update_set(
        &mut self,
        name: &str,
        add: &[ipnet::IpNet],
        del: &[ipnet::IpNet],
    ) -> Result<v1::Set, ApiError> {
        let config = self.config.clone();
        let Some(set) = config.sets.iter().find(|s| s.name == name) else {
            let known: Vec<&str> = config.sets.iter().map(|s| s.name.as_str()).collect();
            return Err(ApiError::NotFound(format!(
                "unknown set {name:?}; this gateway has: {}",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        };
        let entry = self
            .model
            .edit_set(&config.sets, set, add, del)
            .map_err(ApiError::FailedPrecondition)?;
        self.record(vec![entry]);
        Ok(view::set(set, &self.model.set_elements(set)))
    }

    /// An uplink as the API shows it, without traffic counters (the API reads those).
    pub(super) fn uplink_view(&self, i: usize) -> v1::Uplink {
        let carried = view::carried(&self.config, &self.model);
        view::uplink(&self.config, &self.model, &carried, i)
    }
}
