//! OpenTelemetry: with OTEL_EXPORTER_OTLP_ENDPOINT set, a failover reaches an OTLP trace
//! receiver (an in-process tonic TraceService) as a span with the right attributes.

use std::sync::mpsc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use uplink_tests::{Lab, two_uplinks};

/// A received span: name, its attributes and its resource's, as text.
type Received = (String, Vec<(String, String)>, Vec<(String, String)>);

struct Collector(std::sync::Mutex<mpsc::Sender<Received>>);

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let tx = self.0.lock().unwrap().clone();
        for rs in req.into_inner().resource_spans {
            let resource: Vec<(String, String)> = rs
                .resource
                .map(|r| {
                    r.attributes
                        .iter()
                        .map(|a| (a.key.clone(), text(&a.value)))
                        .collect()
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    let attrs = span
                        .attributes
                        .iter()
                        .map(|a| (a.key.clone(), text(&a.value)))
                        .collect();
                    let _ = tx.send((span.name.clone(), attrs, resource.clone()));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[test]
fn failover_span_reaches_an_otlp_receiver() -> anyhow::Result<()> {
    let uplinks = two_uplinks();
    let mut lab = Lab::build("otel", uplinks, 2, 0)?;
    let (tx, rx) = mpsc::channel();
    let gw = lab.ns("gw");
    // The receiver lives in the gateway's namespace, where the agent exports to.
    let file = std::fs::File::open(format!("/run/netns/{gw}"))?;
    std::thread::spawn(move || {
        use std::os::fd::AsFd;
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Collector(std::sync::Mutex::new(
                    tx,
                ))))
                .serve("127.0.0.1:4317".parse().unwrap())
                .await;
        });
    });
    lab.agent_env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
            "http://127.0.0.1:4317".into(),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ("OTEL_SERVICE_NAME".into(), "uplinkd-lab".into()),
        ("OTEL_RESOURCE_ATTRIBUTES".into(), "site=lab".into()),
    ];
    let api = lab.api_config()?;
    lab.write_config("10s", "10m", &api)?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    assert_eq!(lab.ctl("view", &["status"])?.0, 0);
    let moved = assigned
        .values()
        .filter(|u| *u == "isp1")
        .count()
        .to_string();
    lab.carrier("isp1", false)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut names = Vec::new();
    while std::time::Instant::now() < deadline {
        let Ok((name, attrs, resource)) = rx.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        if name == "failover" {
            let get = |k: &str| attrs.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str());
            assert_eq!(get("uplink"), Some("isp1"), "{attrs:?}");
            assert_eq!(get("clients_moved"), Some(moved.as_str()), "{attrs:?}");
            assert!(
                resource.contains(&("service.name".into(), "uplinkd-lab".into())),
                "{resource:?}"
            );
            assert!(
                resource.contains(&("site".into(), "lab".into())),
                "{resource:?}"
            );
            assert!(
                names.iter().any(|n: &String| n == "apply"),
                "apply spans come too: {names:?}"
            );
            return Ok(());
        }
        names.push(name);
    }
    anyhow::bail!("no failover span received; got {names:?}")
}
