//! A TCP proxy the test controls, to cut a worker off from PostgreSQL without disturbing the shared
//! server or other tests: `cut()` drops every open connection and refuses new ones; `restore()`
//! lets them through again.

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

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.stop.cancel();
    }
}
