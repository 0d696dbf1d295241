//! A TCP proxy the test controls, to cut a worker off from PostgreSQL without disturbing the shared
//! server or other tests: `cut()` drops every open connection and refuses new ones; `restore()`
//! lets them through again. [`TcpProxy::holding_queue_declarations`] makes a broker that takes
//! connections but never answers a queue declaration (what a RabbitMQ out of file handles does).

use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct TcpProxy {
    pub addr: std::net::SocketAddr,
    /// Cancelled while the link is cut; replaced on restore.
    link: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl TcpProxy {
    /// Listens on 127.0.0.1:0 and forwards to `upstream`.
    pub async fn start(upstream: &str) -> Self {
        Self::listen(upstream, false).await
    }

    /// Forwards AMQP to the broker at `upstream` up to a client's first `queue.declare`, which is
    /// held back with everything after it: the broker never sees it, and the client waits for an
    /// answer that never comes, on a connection that stays open.
    pub async fn holding_queue_declarations(upstream: &str) -> Self {
        Self::listen(upstream, true).await
    }

    async fn listen(upstream: &str, hold_declarations: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let link = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (upstream, state, stopped) = (upstream.to_string(), link.clone(), stop.clone());
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
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else { return };
                    if hold_declarations {
                        let (mut client_read, mut client_write) = client.split();
                        let (mut server_read, mut server_write) = server.split();
                        let upstream = async {
                            let _ = forward_until_queue_declare(&mut client_read, &mut server_write).await;
                            std::future::pending::<()>().await;
                        };
                        tokio::select! {
                            () = upstream => {}
                            _ = tokio::io::copy(&mut server_read, &mut client_write) => {}
                            () = token.cancelled() => {}
                        }
                        return;
                    }
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        () = token.cancelled() => {}
                    }
                });
            }
        });
        Self { addr, link, stop }
    }

    pub fn cut(&self) {
        self.link.lock().expect("proxy lock").cancel();
    }

    pub fn restore(&self) {
        *self.link.lock().expect("proxy lock") = CancellationToken::new();
    }
}

/// Copies a client's AMQP 0-9-1 stream (the 8-byte protocol header, then frames: type, channel,
/// payload size, payload, 0xCE) to the broker frame by frame, and returns when the next frame is a
/// `queue.declare` method (class 50, method 10), without sending it.
async fn forward_until_queue_declare(
    client: &mut (impl tokio::io::AsyncRead + Unpin),
    server: &mut (impl tokio::io::AsyncWrite + Unpin),
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut header = [0u8; 8];
    client.read_exact(&mut header).await?;
    server.write_all(&header).await?;
    loop {
        let mut head = [0u8; 7];
        client.read_exact(&mut head).await?;
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut rest = vec![0u8; size + 1];
        client.read_exact(&mut rest).await?;
        if head[0] == 1 && rest.len() >= 4 && rest[..4] == [0, 50, 0, 10] {
            return Ok(());
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
