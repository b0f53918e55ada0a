//! The task that runs one Activate stream for the actor.

use std::sync::Arc;

use gpuswap::{SupervisorClient, pb};
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument as _, Span};

use super::Message;

/// Runs one Activate stream, forwarding its events to the actor, until the
/// actor lets go of it (dropping the release sender), which closes the stream.
///
/// `span` covers the activation until the model is ready (or failed), not
/// the hold that follows, which may last for hours.
pub(super) async fn activation_stream(
    mut client: SupervisorClient,
    model: Arc<str>,
    activation: u64,
    client_name: String,
    tx: mpsc::UnboundedSender<Message>,
    mut release: oneshot::Receiver<()>,
    mut span: Span,
) {
    let mut request = tonic::Request::new(pb::ActivateRequest {
        model: model.to_string(),
        hold: true,
        force: false,
        client: client_name,
    });
    span.in_scope(|| gpuswap_telemetry::inject_grpc(request.metadata_mut()));
    let ended = |error| Message::Ended {
        model: Arc::clone(&model),
        activation,
        error,
    };
    let response = tokio::select! {
        _ = &mut release => return,
        response = client.activate(request).instrument(span.clone()) => response,
    };
    let mut stream = match response {
        Ok(response) => response.into_inner(),
        Err(status) => {
            span.record("outcome", "error");
            let _ = tx.send(ended(Some(status)));
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut release => return,
            message = stream.message() => match message {
                Ok(Some(pb::ActivateEvent { event: Some(event), .. })) => {
                    use pb::activate_event::Event as E;
                    let outcome = match &event {
                        E::Ready(_) => Some("ready"),
                        E::Failed(_) => Some("failed"),
                        _ => None,
                    };
                    if let Some(outcome) = outcome {
                        span.record("outcome", outcome);
                        span = Span::none();
                    }
                    let _ = tx.send(Message::Event { model: Arc::clone(&model), activation, event });
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    let _ = tx.send(ended(None));
                    return;
                }
                Err(status) => {
                    let _ = tx.send(ended(Some(status)));
                    return;
                }
            },
        }
    }
}
