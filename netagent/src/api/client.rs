//! The other end of the API: HTTP/1.1 over the Unix socket, one connection per
//! request. Used by the CLI commands and by the tests.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, header};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::bpf::EgressRules;
use crate::controller::SlotView;
use crate::slot::{GuestLink, PolicyRequest, RateLimitSpec};
use crate::stats::SlotCounters;

/// Default time allowed for one request (slot creation included).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a request to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error(
        "netagent is not running: nothing answers on {socket} (start it with `netagent up`, or pass --socket)"
    )]
    NotRunning {
        /// The socket path.
        socket: PathBuf,
    },
    /// The socket exists but this user may not connect.
    #[error(
        "permission denied on {socket}: the API socket is root-only unless the agent runs with socket_group; run this as root or as a member of that group"
    )]
    PermissionDenied {
        /// The socket path.
        socket: PathBuf,
    },
    /// Connecting failed otherwise.
    #[error("cannot connect to {socket}: {source}")]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The HTTP exchange failed.
    #[error("talking to netagent on {socket} failed: {source}")]
    Http {
        /// The socket path.
        socket: PathBuf,
        /// The underlying error.
        source: hyper::Error,
    },
    /// The request could not be built (a bad method or path).
    #[error("invalid request: {0}")]
    Request(String),
    /// The daemon did not answer in time.
    #[error("netagent on {socket} did not answer within {timeout:?}")]
    Timeout {
        /// The socket path.
        socket: PathBuf,
        /// The time allowed.
        timeout: Duration,
    },
    /// The daemon answered with an error.
    #[error("{message} (HTTP {status})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The `error` field of the body.
        message: String,
    },
    /// The answer is not what the API documents.
    #[error("unexpected answer from netagent ({what}): {detail}")]
    Decode {
        /// What was being read.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
}

/// A raw answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type`, if any.
    pub content_type: Option<String>,
    /// `Allow`, if any.
    pub allow: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json<T: DeserializeOwned>(&self, what: &'static str) -> Result<T, ClientError> {
        serde_json::from_slice(&self.body).map_err(|e| ClientError::Decode {
            what,
            detail: format!("{e}: {}", self.text()),
        })
    }

    /// `Err(ClientError::Api)` unless the status is 2xx.
    pub fn ok(self) -> Result<Reply, ClientError> {
        if (200..300).contains(&self.status) {
            return Ok(self);
        }
        let message = serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| self.text());
        Err(ClientError::Api {
            status: self.status,
            message,
        })
    }
}

/// A client of one daemon socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Changes the per-request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and returns whatever the daemon answered.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Reply, ClientError> {
        match tokio::time::timeout(self.timeout, self.exchange(method, path, body)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout {
                socket: self.socket.clone(),
                timeout: self.timeout,
            }),
        }
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Reply, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| match source.kind() {
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                        ClientError::NotRunning {
                            socket: self.socket.clone(),
                        }
                    }
                    io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
                        socket: self.socket.clone(),
                    },
                    _ => ClientError::Connect {
                        socket: self.socket.clone(),
                        source,
                    },
                })?;
        let http_err = |source| ClientError::Http {
            socket: self.socket.clone(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http_err)?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|e| ClientError::Request(e.to_string()))?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "netagent");
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default())))
            .map_err(|e| ClientError::Request(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(http_err)?;
        let status = resp.status().as_u16();
        let header_text = |name| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header_text(header::CONTENT_TYPE);
        let allow = header_text(header::ALLOW);
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(http_err)?
            .to_bytes()
            .to_vec();
        conn.abort();
        Ok(Reply {
            status,
            content_type,
            allow,
            body,
        })
    }

    /// `PUT /v1/slots/{n}`: the slot and whether this request created it.
    pub async fn create_slot(
        &self,
        index: i64,
        guest: &GuestLink,
    ) -> Result<(SlotView, bool), ClientError> {
        self.create_slot_with(index, guest, &PolicyRequest::default())
            .await
    }

    /// `PUT /v1/slots/{n}` with security settings (each given one is sent).
    pub async fn create_slot_with(
        &self,
        index: i64,
        guest: &GuestLink,
        policy: &PolicyRequest,
    ) -> Result<(SlotView, bool), ClientError> {
        let encode = |e: serde_json::Error| ClientError::Request(e.to_string());
        let mut body = match guest {
            GuestLink::Tap => serde_json::Map::new(),
            GuestLink::Veth { .. } => match serde_json::to_value(guest).map_err(encode)? {
                serde_json::Value::Object(map) => map,
                _ => serde_json::Map::new(),
            },
        };
        if let Some(mac) = policy.guest_mac {
            body.insert("guest_mac".into(), mac.to_string().into());
        }
        if let Some(egress) = &policy.egress {
            body.insert(
                "egress".into(),
                serde_json::to_value(egress).map_err(encode)?,
            );
        }
        if let Some(limit) = &policy.rate_limit {
            body.insert(
                "rate_limit".into(),
                serde_json::to_value(limit).map_err(encode)?,
            );
        }
        let body = if body.is_empty() {
            None
        } else {
            Some(serde_json::to_vec(&body).map_err(encode)?)
        };
        let reply = self
            .request("PUT", &format!("/v1/slots/{index}"), body.as_deref())
            .await?
            .ok()?;
        Ok((reply.json("slot")?, reply.status == 201))
    }

    /// `PUT /v1/slots/{n}/egress`: replaces the slot's egress lists.
    pub async fn set_egress(
        &self,
        index: i64,
        egress: &EgressRules,
    ) -> Result<SlotView, ClientError> {
        let body = serde_json::to_vec(egress).map_err(|e| ClientError::Request(e.to_string()))?;
        self.request("PUT", &format!("/v1/slots/{index}/egress"), Some(&body))
            .await?
            .ok()?
            .json("slot")
    }

    /// `PUT /v1/slots/{n}/rate_limit` (`Some`) or `DELETE` it (`None`).
    pub async fn set_rate_limit(
        &self,
        index: i64,
        limit: Option<&RateLimitSpec>,
    ) -> Result<SlotView, ClientError> {
        let path = format!("/v1/slots/{index}/rate_limit");
        let reply = match limit {
            Some(limit) => {
                let body =
                    serde_json::to_vec(limit).map_err(|e| ClientError::Request(e.to_string()))?;
                self.request("PUT", &path, Some(&body)).await?
            }
            None => self.request("DELETE", &path, None).await?,
        };
        reply.ok()?.json("slot")
    }

    /// `DELETE /v1/slots/{n}`.
    pub async fn delete_slot(&self, index: i64) -> Result<(), ClientError> {
        self.request("DELETE", &format!("/v1/slots/{index}"), None)
            .await?
            .ok()?;
        Ok(())
    }

    /// `GET /v1/slots/{n}`.
    pub async fn slot(&self, index: i64) -> Result<SlotView, ClientError> {
        self.get_json(&format!("/v1/slots/{index}"), "slot").await
    }

    /// `GET /v1/slots`.
    pub async fn slots(&self) -> Result<Vec<SlotView>, ClientError> {
        self.get_json("/v1/slots", "slot list").await
    }

    /// `GET /v1/slots/{n}/stats`.
    pub async fn stats(&self, index: i64) -> Result<SlotCounters, ClientError> {
        self.get_json(&format!("/v1/slots/{index}/stats"), "slot stats")
            .await
    }

    /// `GET /v1/verify`: the differences between the kernel and the agent.
    pub async fn verify(&self) -> Result<crate::verify::VerifyReport, ClientError> {
        self.get_json("/v1/verify", "verify report").await
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        Ok(self.request("GET", "/metrics", None).await?.ok()?.text())
    }

    async fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
        what: &'static str,
    ) -> Result<T, ClientError> {
        self.request("GET", path, None).await?.ok()?.json(what)
    }
}
