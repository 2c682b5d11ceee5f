//! API writes, served by the agent loop and applied to the kernel before they answer.
//! Reads are served from the snapshot (`api::snapshot`) without the loop.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use uplink_api::v1;

use super::Agent;
use crate::api::{ApiError, Command, view};
use crate::model::failover::PinRefused;
use crate::model::now_millis;

impl Agent {
    /// Serves one API command. Writes apply to the kernel before they answer.
    pub(super) async fn handle(&mut self, cmd: Command) {
        match cmd {
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
                let r = match self.model.unpin(ip, now_millis()) {
                    None => Err(ApiError::NotFound(format!("no override for {ip}"))),
                    Some(entry) => {
                        self.record(vec![entry]);
                        self.apply_for_api().await
                    }
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
            Command::UpdateSet {
                set,
                add,
                del,
                reply,
            } => {
                let r = self.update_set(&set, &add, &del).await;
                let _ = reply.send(r);
            }
            Command::Watch(reply) => {
                let history = self.events.recent().map(view::event).collect();
                let _ = reply.send(Ok((history, self.event_tx.subscribe())));
            }
        }
    }

    fn unknown_uplink(&self, name: &str) -> ApiError {
        crate::api::snapshot::unknown_uplink(&self.config, name)
    }

    async fn apply_for_api(&mut self) -> Result<(), ApiError> {
        let report = self.apply(crate::dataplane::ReadBack::Cache).await;
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
        self.apply_for_api().await?;
        Ok(v1::Override {
            client: ip.to_string(),
            uplink: o.uplink,
            expires_at_ms: o.until.unwrap_or(0),
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

    async fn update_set(
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
        self.apply_for_api().await?;
        Ok(view::set(set, &self.model.set_elements(set)))
    }

    /// An uplink as the API shows it, without traffic counters (the API reads those).
    fn uplink_view(&self, i: usize) -> v1::Uplink {
        let carried = view::carried(&self.config, &self.model);
        view::uplink(&self.config, &self.model, &carried, i)
    }
}
