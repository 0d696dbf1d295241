//! A TCP proxy the test controls, to cut a worker off from PostgreSQL or RabbitMQ without disturbing
//! the shared servers or other tests: `cut()` drops every open connection and refuses new ones;
//! `restore()` lets them through again. [`TcpProxy::amqp`] also reads the client's AMQP frames, to
//! make a broker that never answers one method: [`TcpProxy::hold_from`] holds back a method and
//! everything after it (what a RabbitMQ out of file handles does with a queue declaration),
//! [`TcpProxy::drop_next`] swallows the next such method and lets the rest through (heartbeats
//! included, so the connection lives on and only that answer never comes).

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// An AMQP 0-9-1 method: (class id, method id).
pub type Method = (u16, u16);
pub const QUEUE_DECLARE: Method = (50, 10);
pub const BASIC_CONSUME: Method = (60, 20);

pub struct TcpProxy {
    pub addr: std::net::SocketAddr,
    /// The `host:port` it forwards to.
    upstream: String,
    /// Cancelled while the link is cut; replaced on restore.
    link: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
    /// Set for an AMQP proxy: what it does to the client's frames.
    rules: Option<Arc<Mutex<Rules>>>,
}

/// What an AMQP proxy does to the methods a client sends.
#[derive(Default)]
struct Rules {
    /// This method and everything after it on the connection is held back.
    hold_from: Option<Method>,
    /// The next frame of this method (on any connection) is swallowed.
    drop_next: Option<Method>,
}

impl TcpProxy {
    /// Listens on 127.0.0.1:0 and forwards to `upstream`.
    pub async fn start(upstream: &str) -> Self {
        Self::listen(upstream, None).await
    }

    /// Forwards AMQP to the broker at `upstream` frame by frame, under [`Self::hold_from`] and
    /// [`Self::drop_next`].
    pub async fn amqp(upstream: &str) -> Self {
        Self::listen(upstream, Some(Arc::default())).await
    }

    /// From now on, a connection's first `method` is held back with everything after it: the broker
    /// never sees them, and the client waits for an answer that never comes, on a connection that
    /// stays open.
    pub fn hold_from(&self, method: Method) {
        self.rules.as_ref().expect("an AMQP proxy").lock().expect("proxy lock").hold_from = Some(method);
    }

    /// The next `method` any client sends is swallowed; everything else goes through.
    pub fn drop_next(&self, method: Method) {
        self.rules.as_ref().expect("an AMQP proxy").lock().expect("proxy lock").drop_next = Some(method);
    }

    /// `url` (of the service this proxy forwards to) pointed at the proxy instead.
    pub fn route(&self, url: &str) -> String {
        assert!(url.contains(&self.upstream), "{url:?} does not name the proxy's upstream {}", self.upstream);
        url.replace(&self.upstream, &self.addr.to_string())
    }

    async fn listen(upstream: &str, rules: Option<Arc<Mutex<Rules>>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let link = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (target, state, stopped, connection_rules) = (upstream.to_string(), link.clone(), stop.clone(), rules.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = stopped.cancelled() => return,
                };
                let Ok((mut client, _)) = accepted else { continue };
                let token = state.lock().expect("proxy lock").clone();
                if token.is_cancelled() {
                    continue; // refused: dropping the socket closes it
                }
                let (upstream, rules) = (target.clone(), connection_rules.clone());
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else { return };
                    match rules {
                        None => {
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                                () = token.cancelled() => {}
                            }
                        }
                        Some(rules) => {
                            let (mut client_read, mut client_write) = client.split();
                            let (mut server_read, mut server_write) = server.split();
                            tokio::select! {
                                _ = forward_frames(&mut client_read, &mut server_write, &rules) => {}
                                _ = tokio::io::copy(&mut server_read, &mut client_write) => {}
                                () = token.cancelled() => {}
                            }
                        }
                    }
                });
            }
        });
        Self { addr, upstream: upstream.to_string(), link, stop, rules }
    }

    pub fn cut(&self) {
        self.link.lock().expect("proxy lock").cancel();
    }

    pub fn restore(&self) {
        *self.link.lock().expect("proxy lock") = CancellationToken::new();
    }
}

/// Copies a client's AMQP 0-9-1 stream (the 8-byte protocol header, then frames: type, channel,
/// payload size, payload, 0xCE) to the broker frame by frame under `rules`. Once a frame is held,
/// nothing more is sent (the client's stream is left unread until the connection ends).
async fn forward_frames(
    client: &mut (impl AsyncRead + Unpin),
    server: &mut (impl AsyncWrite + Unpin),
    rules: &Mutex<Rules>,
) -> std::io::Result<()> {
    let mut header = [0u8; 8];
    client.read_exact(&mut header).await?;
    server.write_all(&header).await?;
    loop {
        let mut head = [0u8; 7];
        client.read_exact(&mut head).await?;
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut rest = vec![0u8; size + 1];
        client.read_exact(&mut rest).await?;
        // A method frame (type 1) starts its payload with the class and method ids.
        let method =
            (head[0] == 1 && rest.len() >= 4).then(|| (u16::from_be_bytes([rest[0], rest[1]]), u16::from_be_bytes([rest[2], rest[3]])));
        let (hold, swallow) = {
            let mut rules = rules.lock().expect("proxy lock");
            let swallow = method.is_some() && method == rules.drop_next;
            if swallow {
                rules.drop_next = None;
            }
            (method.is_some() && method == rules.hold_from, swallow)
        };
        if hold {
            return std::future::pending().await;
        }
        if swallow {
            continue;
        }
        server.write_all(&head).await?;
        server.write_all(&rest).await?;
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.stop.cancel();
    }
}
