//! Connection slots for a listener: a cap on all connections and a smaller one per peer
//! address, so that one host holding idle connections can neither exhaust the agent's
//! descriptors nor lock other clients (an operator, Prometheus) out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Slots {
    total: Arc<Semaphore>,
    max: usize,
    max_per_peer: usize,
    per_peer: Mutex<HashMap<IpAddr, usize>>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener has `max` connections open.
    Full(usize),
    /// This peer has `max_per_peer` open.
    Peer(usize),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Full(n) => write!(f, "{n} connections are open"),
            Refusal::Peer(n) => write!(f, "this address has {n} connections open"),
        }
    }
}

/// One connection's slot, given back when dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    slots: Arc<Slots>,
    peer: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per = self.slots.per_peer.lock().expect("lock");
        if let Some(n) = per.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.peer);
            }
        }
    }
}

impl Slots {
    pub fn new(max: usize, max_per_peer: usize) -> Arc<Slots> {
        Arc::new(Slots {
            total: Arc::new(Semaphore::new(max)),
            max,
            max_per_peer: max_per_peer.min(max),
            per_peer: Mutex::new(HashMap::new()),
        })
    }

    pub fn take(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, Refusal> {
        let mut per = self.per_peer.lock().expect("lock");
        let n = per.entry(peer).or_insert(0);
        if *n >= self.max_per_peer {
            return Err(Refusal::Peer(self.max_per_peer));
        }
        let permit = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Full(self.max))?;
        *n += 1;
        Ok(Slot {
            _permit: permit,
            slots: self.clone(),
            peer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_peer_cannot_take_every_slot() {
        let slots = Slots::new(4, 2);
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let a1 = slots.take(a).unwrap();
        let _a2 = slots.take(a).unwrap();
        assert_eq!(slots.take(a).err(), Some(Refusal::Peer(2)));
        let _b1 = slots.take(b).unwrap();
        let _b2 = slots.take(b).unwrap();
        assert_eq!(
            slots.take("192.0.2.3".parse().unwrap()).err(),
            Some(Refusal::Full(4))
        );
        drop(a1);
        assert!(
            slots.take(a).is_ok(),
            "a slot comes back when its connection closes"
        );
    }
}
