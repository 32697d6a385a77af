//! The agent's HTTP endpoint on `metrics_address`: `/healthz`, `/readyz`, and whatever is
//! added to the [`Router`] later (`/metrics`).
//!
//! hyper serves HTTP/1.1 (it is already in the build as kube's HTTP client, so the server
//! half costs little); routing is a table of exact paths, which is all probes and a
//! metrics scrape need.

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::TcpListener;
use tracing::debug;

/// Errors of the HTTP endpoint.
#[derive(Debug, Error)]
pub enum HttpError {
    /// The listening socket could not be opened.
    #[error("listening on {address} (metrics_address): {source}")]
    Bind {
        /// The address asked for.
        address: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// What a handler answers: a status and a plain-text body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// Content type of the body.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl Reply {
    /// A `text/plain` reply.
    pub fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// A route's handler; called for every GET (or HEAD) of its path.
pub type Handler = Arc<dyn Fn() -> Reply + Send + Sync>;

/// Exact-path routes for GET requests.
#[derive(Clone, Default)]
pub struct Router {
    routes: HashMap<String, Handler>,
}

impl Router {
    /// An empty router (every path answers 404).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the handler of `path`.
    pub fn route(
        mut self,
        path: &str,
        handler: impl Fn() -> Reply + Send + Sync + 'static,
    ) -> Self {
        self.routes.insert(path.to_string(), Arc::new(handler));
        self
    }

    /// Answers one request.
    pub fn handle(&self, method: &Method, path: &str) -> Reply {
        let Some(handler) = self.routes.get(path) else {
            return Reply::text(StatusCode::NOT_FOUND, "not found\n");
        };
        if method != Method::GET && method != Method::HEAD {
            return Reply::text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        }
        handler()
    }

    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let reply = self.handle(req.method(), req.uri().path());
        let mut resp = Response::new(Full::new(Bytes::from(reply.body)));
        *resp.status_mut() = reply.status;
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(reply.content_type),
        );
        resp
    }
}

/// Binds `address` and serves `router` on a spawned task; returns the bound address
/// (port 0 picks one).
pub async fn serve(address: SocketAddr, router: Router) -> Result<SocketAddr, HttpError> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| HttpError::Bind { address, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| HttpError::Bind { address, source })?;
    let router = Arc::new(router);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    debug!("accepting an HTTP connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let router = router.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let resp = router.respond(&req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!(%peer, "HTTP connection: {e}");
                }
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_exact_path_and_method() {
        let router = Router::new().route("/healthz", || Reply::text(StatusCode::OK, "ok\n"));
        assert_eq!(
            router.handle(&Method::GET, "/healthz").status,
            StatusCode::OK
        );
        assert_eq!(
            router.handle(&Method::GET, "/healthz/x").status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            router.handle(&Method::POST, "/healthz").status,
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn serves_over_tcp() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let router = Router::new().route("/readyz", || {
                Reply::text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            });
            let addr = serve("127.0.0.1:0".parse().expect("addr"), router)
                .await
                .expect("serve");
            let text = tokio::task::spawn_blocking(move || {
                use std::io::{Read as _, Write as _};
                let mut s = std::net::TcpStream::connect(addr).expect("connect");
                s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .expect("write");
                let mut out = String::new();
                s.read_to_string(&mut out).expect("read");
                out
            })
            .await
            .expect("join");
            assert!(text.starts_with("HTTP/1.1 503"), "{text}");
            assert!(text.ends_with("not ready\n"), "{text}");
        });
    }
}
