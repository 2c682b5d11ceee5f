//! Logs (human or JSON, `RUST_LOG` filtering) and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is
//! set, span export over OTLP/gRPC (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` and the
//! other standard OTEL_* variables are honoured by the SDK).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the exporter alive; `shutdown` flushes what is buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            eprintln!("warning: flushing traces failed: {e}");
        }
    }
}

/// Must run inside the tokio runtime: the OTLP exporter's channel lives on it.
pub fn init(json: bool, ansi: bool) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt: Box<dyn Layer<_> + Send + Sync> = if json {
        fmt.json().flatten_event(true).boxed()
    } else {
        fmt.with_ansi(ansi).boxed()
    };
    let provider = match std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT") {
        None => None,
        Some(_) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| format!("OTLP exporter (OTEL_EXPORTER_OTLP_ENDPOINT): {e}"))?;
            let resource = match std::env::var_os("OTEL_SERVICE_NAME") {
                Some(_) => Resource::builder().build(),
                None => Resource::builder().with_service_name("uplinkd").build(),
            };
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("uplinkd")));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .init();
    Ok(Telemetry { provider })
}
