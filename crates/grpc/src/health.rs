//! `grpc.health.v1.Health`: SERVING while the server is ready (every model loaded and tuned with
//! a healthy device, not draining), NOT_SERVING otherwise, so Kubernetes' gRPC probes and
//! balancers that use the health service see what readiness says.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::proto::health::health_check_response::ServingStatus;
use crate::proto::health::health_server;
use crate::proto::health::{HealthCheckRequest, HealthCheckResponse};
use ortserve_core::app::AppState;

/// The services the health service answers for: the server as a whole (`""`) and the
/// inference service.
const SERVICES: [&str; 2] = ["", "inference.GRPCInferenceService"];

/// How often `Watch` looks at readiness.
const WATCH_EVERY: Duration = Duration::from_millis(500);

pub struct Health {
    app: Arc<AppState>,
}

impl Health {
    pub fn new(app: Arc<AppState>) -> Health {
        Health { app }
    }
}

fn status_of(app: &AppState, service: &str) -> Option<ServingStatus> {
    SERVICES.contains(&service).then(|| {
        if app.is_ready() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    })
}

#[tonic::async_trait]
impl health_server::Health for Health {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        match status_of(&self.app, &service) {
            Some(s) => Ok(Response::new(HealthCheckResponse { status: s as i32 })),
            None => Err(Status::not_found(format!("unknown service {service:?}"))),
        }
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    /// The status now, then each change, until the client goes or the server drains.
    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = request.into_inner().service;
        let app = self.app.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let now = status_of(&app, &service).unwrap_or(ServingStatus::ServiceUnknown);
                if last != Some(now) {
                    let msg = HealthCheckResponse { status: now as i32 };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    last = Some(now);
                }
                // Draining: the last status sent is NOT_SERVING; the stream ends so that the
                // drain does not wait on it.
                if app.is_draining() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(WATCH_EVERY) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
