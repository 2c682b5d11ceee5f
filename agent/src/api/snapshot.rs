//! What the API reads: a snapshot the agent loop publishes after every change. The model's
//! client maps are persistent, so a snapshot of 100k clients costs a pointer copy, and a
//! viewer listing every client in a loop never holds the loop up.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use uplink_api::v1;

use super::{ApiError, view};
use crate::config::Config;
use crate::model::{Mac, Model};

#[derive(Clone)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub model: Model,
    pub generation: u64,
    pub in_sync: bool,
    /// Parts of the config the kernel refused, with its words.
    pub refused: Arc<Vec<String>>,
    pub started: Instant,
    /// The placeholder held until the loop publishes its first model (the state restored,
    /// the kernel read, the first apply done and its decisions on disk): reads are refused
    /// meanwhile, not answered from an empty model.
    pub starting: bool,
}

/// The error for an uplink name the config does not have, naming the ones it has.
pub fn unknown_uplink(config: &Config, name: &str) -> ApiError {
    let known: Vec<&str> = config.uplinks.iter().map(|u| u.name.as_str()).collect();
    ApiError::NotFound(format!(
        "unknown uplink {name:?}; this gateway has {}",
        known.join(", ")
    ))
}

impl Snapshot {
    pub fn status(&self) -> v1::AgentStatus {
        v1::AgentStatus {
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
            in_sync: self.in_sync,
            overrides: self.model.overrides.len() as u64,
            refused: self.refused.to_vec(),
        }
    }

    /// Every uplink, without traffic counters (the API reads those).
    pub fn uplinks(&self) -> Vec<v1::Uplink> {
        let carried = view::carried(&self.config, &self.model);
        (0..self.config.uplinks.len())
            .map(|i| view::uplink(&self.config, &self.model, &carried, i))
            .collect()
    }

    /// One page of clients after `after` (the previous page's last MAC): a page costs its
    /// own size, not the whole client list. Returns the page and the next token.
    pub fn clients(
        &self,
        uplink: Option<&str>,
        after: Option<Mac>,
        limit: usize,
    ) -> Result<(Vec<v1::Client>, Option<String>), ApiError> {
        if let Some(u) = uplink
            && self.model.uplink(u).is_none()
        {
            return Err(unknown_uplink(&self.config, u));
        }
        let start = match after {
            None => std::ops::Bound::Unbounded,
            Some(mac) => std::ops::Bound::Excluded(mac),
        };
        let mut out: Vec<v1::Client> = Vec::new();
        let mut next = None;
        let spread = view::spread_by_policy(&self.config, &self.model);
        for (_, c) in self
            .model
            .clients()
            .range((start, std::ops::Bound::Unbounded))
        {
            let v = view::client(&self.config, &self.model, spread.as_deref(), c);
            if uplink.is_some_and(|u| v.home_uplink != u && v.current_uplink != u) {
                continue;
            }
            if out.len() == limit {
                next = out.last().map(|l| l.mac.clone());
                break;
            }
            out.push(v);
        }
        Ok((out, next))
    }

    /// A client by one of its addresses or its MAC.
    pub fn client(&self, key: &str) -> Result<v1::Client, ApiError> {
        let found = match (key.parse::<IpAddr>(), key.parse::<Mac>()) {
            (Ok(ip), _) => self.model.client_by_addr(&ip),
            (_, Ok(mac)) => self.model.clients().get(&mac),
            _ => {
                return Err(ApiError::InvalidArgument(format!(
                    "client: {key:?} is neither an IP address nor a MAC address"
                )));
            }
        };
        found
            .map(|c| {
                let spread = view::spread_by_policy(&self.config, &self.model);
                view::client(&self.config, &self.model, spread.as_deref(), c)
            })
            .ok_or_else(|| ApiError::NotFound(format!("no client {key} on this gateway")))
    }

    pub fn overrides(&self) -> Vec<v1::Override> {
        self.model
            .overrides
            .iter()
            .map(|(ip, o)| v1::Override {
                client: ip.to_string(),
                uplink: o.uplink.clone(),
                expires_at_ms: o.until.unwrap_or(0),
            })
            .collect()
    }
}
