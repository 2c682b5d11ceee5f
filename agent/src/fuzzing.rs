//! Entry points for the coverage-guided fuzz targets in `fuzz/` and for the test that
//! replays their corpora on every CI run: each feeds untrusted bytes to one parser or
//! validator, which must return an error, never panic.

use std::path::Path;

use prost::Message;
use uplink_api::v1;

use crate::api::{auth, validate};
use crate::config::Config;
use crate::dataplane::nft;
use crate::model::{Model, state_file};

/// One fuzz target: untrusted bytes in, nothing out.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name (the `fuzz/corpus/<name>` folders).
pub const TARGETS: [(&str, Target); 5] = [
    ("config", config),
    ("state_file", state_file),
    ("nft_listing", nft_listing),
    ("grpc_request", grpc_request),
    ("cert_role", cert_role),
];

/// A config file.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(Path::new("fuzz.toml"), text);
    }
}

const MODEL_CONFIG: &str = "[lan]\ninterfaces=[\"br-lan\"]\n[[uplink]]\nname=\"isp1\"\ninterface=\"wan1\"\ngateway=\"100.64.1.1\"\n[[uplink]]\nname=\"isp2\"\ninterface=\"wan2\"\ngateway=\"100.64.2.1\"\n";

/// A state file or a decisions file, and what restoring it does to a model.
pub fn state_file(data: &[u8]) {
    let path = Path::new("fuzz.json");
    let config = Config::parse(path, MODEL_CONFIG).expect("the fixed config parses");
    let mut model = Model::new(&config);
    if let Ok(r) = state_file::parse(path, data) {
        model.restore(r.clients);
    }
    if let Ok(d) = state_file::parse_decisions(path, data) {
        model.restore_decisions(d);
    }
    let _ = crate::plan::plan(&config, &model);
}

/// `nft -j list table` output (the reference reading), and nft's structure listing as the
/// netlink reading takes it.
pub fn nft_listing(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(k) = nft::parse_listing(text) {
            let _ = nft::adopted_homes(&k, |_| true);
        }
        let _ = nft::parse_structure(text, "uplinkd");
    }
}

/// A gRPC request body as the server decodes it, then the validation of its fields. The
/// first byte picks the request type.
pub fn grpc_request(data: &[u8]) {
    let Some((kind, body)) = data.split_first() else {
        return;
    };
    match kind % 6 {
        0 => {
            if let Ok(r) = v1::SetOverrideRequest::decode(body) {
                let _ = validate::ip("client", &r.client);
                let _ = validate::non_empty("uplink", &r.uplink);
                let _ = validate::pin_duration(&r.duration);
            }
        }
        1 => {
            if let Ok(r) = v1::ListClientsRequest::decode(body) {
                let _ = validate::page(r.page_size, &r.page_token);
                let _ = validate::non_empty("uplink", &r.uplink);
            }
        }
        2 => {
            if let Ok(r) = v1::GetClientRequest::decode(body) {
                let _ = validate::non_empty("client", &r.client);
            }
        }
        3 => {
            if let Ok(r) = v1::ClearOverrideRequest::decode(body) {
                let _ = validate::ip("client", &r.client);
            }
        }
        4 => {
            if let Ok(r) = v1::ExplainRequest::decode(body) {
                let _ = validate::flow(&r);
            }
        }
        _ => {
            if let Ok(r) = v1::UpdateSetRequest::decode(body) {
                let _ = validate::non_empty("set", &r.set);
                let _ = validate::cidrs("add", &r.add);
                let _ = validate::cidrs("del", &r.del);
            }
        }
    }
}

/// A client certificate (DER) as the handshake passed it on.
pub fn cert_role(data: &[u8]) {
    let _ = auth::role_of(&rustls::pki_types::CertificateDer::from(data));
}
