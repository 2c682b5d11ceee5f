//! What the API and the metrics endpoint share to accept connections: TLS server configs
//! (certificates reloaded when their files change) and connection limits per peer.

pub mod limit;
pub mod tls;
