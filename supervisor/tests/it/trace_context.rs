//! An Activate carrying W3C trace context (`traceparent` metadata) is traced as part of the
//! caller's trace: the activation's span and the phases of the swap it causes.

use crate::common::{Mock, Supervisor};
use gpuswap::pb;
use gpuswap_telemetry::testing::{OtlpReceiver, ReceivedSpan};
use testkit::DEADLINE;

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN_ID: &str = "b7ad6b7169203331";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activation_and_its_swap_continue_the_callers_trace() {
    let receiver = OtlpReceiver::start().await.expect("OTLP receiver");
    let sup = Supervisor::prepare("trace", &[], vec![Mock::new("alpha"), Mock::new("beta")]);
    // The daemon reads the collector from its configuration (no environment needed).
    let config = format!(
        "{}\n[telemetry]\notlp_endpoint = \"{}\"\n",
        sup.config_text(),
        receiver.endpoint()
    );
    std::fs::write(&sup.config_path, config).expect("write config");
    let sup = sup.launch().await;

    // alpha runs first, without trace context: its spans start a trace of their own.
    sup.activate("alpha", false).await.ready().await;

    // beta's activation swaps alpha out, in the caller's trace.
    let mut request = tonic::Request::new(pb::ActivateRequest {
        model: "beta".into(),
        hold: false,
        force: false,
        client: "trace-test".into(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01")
            .parse()
            .expect("metadata value"),
    );
    let mut client = sup.client.clone();
    let mut events = client
        .activate(request)
        .await
        .expect("Activate")
        .into_inner();
    let mut ready = false;
    while let Some(event) = tokio::time::timeout(DEADLINE, events.message())
        .await
        .expect("an event in time")
        .expect("the stream")
    {
        if let Some(pb::activate_event::Event::Ready(_)) = event.event {
            ready = true;
        }
    }
    assert!(ready, "beta became ready");

    let supervisor_span = |name: &'static str| {
        move |span: &ReceivedSpan| {
            span.service_name == "gpuswap-supervisor"
                && span.name == name
                && span.trace_id == TRACE_ID
        }
    };
    let activate = receiver
        .wait_for_span(DEADLINE, supervisor_span("activate"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", sup.log()));
    assert_eq!(activate.parent_span_id, CALLER_SPAN_ID, "{activate:?}");
    assert_eq!(activate.attribute("model"), Some("beta"), "{activate:?}");

    // Every phase of the swap is a child of the activation.
    for (phase, model) in [("stop", "alpha"), ("start", "beta"), ("ready", "beta")] {
        let span = receiver
            .wait_for_span(DEADLINE, |span| {
                supervisor_span("swap")(span) && span.attribute("phase") == Some(phase)
            })
            .await
            .unwrap_or_else(|e| panic!("no {phase} phase: {e}\n{}", sup.log()));
        assert_eq!(span.parent_span_id, activate.span_id, "{span:?}");
        assert_eq!(span.attribute("model"), Some(model), "{span:?}");
    }
    // alpha's own activation had no caller: it is not in this trace.
    let alpha = receiver
        .wait_for_span(DEADLINE, |span| {
            span.service_name == "gpuswap-supervisor"
                && span.name == "activate"
                && span.attribute("model") == Some("alpha")
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", sup.log()));
    assert_ne!(alpha.trace_id, TRACE_ID, "{alpha:?}");
    assert!(alpha.parent_span_id.is_empty(), "{alpha:?}");
}
