//! A request body read once, within `max_body`, `body_timeout` and `queue_memory`.

use axum::{
    body::Body,
    response::{IntoResponse, Response},
};
use bytes::{Bytes, BytesMut};
use gpuswap_telemetry::Refusal;
use http::{HeaderMap, HeaderValue, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::{Gateway, error::ApiError, limits::BodyReservation};

/// Reads a request body once, bounded by `max_body`, counting its bytes in
/// `reservation` (`queue_memory`) as they arrive.
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    max_body: u64,
    reservation: &mut BodyReservation,
) -> Result<Bytes, BodyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max_body) {
        return Err(BodyError::Invalid(ApiError::too_large(max_body)));
    }
    let limit = usize::try_from(max_body).unwrap_or(usize::MAX);
    let mut body = Limited::new(body, limit);
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return Err(BodyError::Invalid(ApiError::too_large(max_body)));
            }
            Err(e) => {
                return Err(BodyError::Invalid(ApiError::invalid_request(
                    "invalid_body",
                    format!("Could not read the request body: {e}"),
                )));
            }
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if !reservation.grow(data.len() as u64) {
            return Err(BodyError::QueueMemory);
        }
        // One frame (the common case) is kept as is: no copy.
        match first.take() {
            None if joined.is_empty() => first = Some(data),
            None => joined.extend_from_slice(&data),
            Some(previous) => {
                joined.extend_from_slice(&previous);
                joined.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| joined.freeze()))
}

/// Why a request body was not read.
#[derive(Debug)]
pub enum BodyError {
    /// Too large or unreadable: the client's error.
    Invalid(ApiError),
    /// The bodies held by the gateway would pass `queue_memory`.
    QueueMemory,
}

/// Reads a request's body within `max_body`, `body_timeout` and `queue_memory`;
/// the refusal to answer otherwise (the connection closes after it).
pub(super) async fn read_request_body(
    gateway: &Gateway,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Bytes, BodyReservation), Response> {
    let mut reservation = gateway.limits.body();
    let reading = read_body(headers, body, gateway.max_body, &mut reservation);
    match tokio::time::timeout(gateway.body_timeout, reading).await {
        Ok(Ok(body)) => Ok((body, reservation)),
        Ok(Err(BodyError::Invalid(e))) => Err(closing(e.into_response())),
        Ok(Err(BodyError::QueueMemory)) => {
            gateway.gw_metrics.refused(Refusal::QueueMemory);
            let limit = gateway.limits.max_bytes();
            Err(closing(ApiError::queue_memory(limit).into_response()))
        }
        Err(_) => {
            gateway.gw_metrics.refused(Refusal::BodyTimeout);
            Err(closing(
                ApiError::body_timeout(gateway.body_timeout).into_response(),
            ))
        }
    }
}

/// An answer given before the request body was read to its end. hyper may
/// close such a connection after the answer, and a client that did not see
/// it coming would send its next request into the closing connection: say so.
pub(super) fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}
