//! `remora tap --proxy ADMIN_ADDR [filters]`: the requests passing one proxy, live, one line
//! each on standard output, from the proxy's `GET /tap` (which serves loopback callers only:
//! run it in the pod, or through `kubectl port-forward`).

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

/// What to watch; every filter given must match.
#[derive(clap::Args, Debug, Clone)]
pub struct TapArgs {
    /// The proxy's admin address (REMORA_ADMIN_ADDR; 4191 in an injected pod).
    #[arg(long)]
    pub proxy: SocketAddr,
    /// inbound or outbound.
    #[arg(long)]
    pub direction: Option<String>,
    /// The request's authority (`host` matches any port, `host:port` one).
    #[arg(long)]
    pub authority: Option<String>,
    /// A path prefix.
    #[arg(long)]
    pub path: Option<String>,
    /// An HTTP method (GET, POST…).
    #[arg(long)]
    pub method: Option<String>,
    /// The peer's SPIFFE ID (inbound: the client; outbound: the server).
    #[arg(long)]
    pub identity: Option<String>,
    /// Events per second at most (the proxy drops and counts the rest).
    #[arg(long)]
    pub rate: Option<u32>,
    /// The fraction of matching requests to show.
    #[arg(long)]
    pub sample: Option<f64>,
    /// Stop after this many requests.
    #[arg(long)]
    pub max: Option<u64>,
    /// Print the proxy's JSON lines as they are.
    #[arg(long)]
    pub json: bool,
}

fn encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl TapArgs {
    fn query(&self) -> String {
        let mut q = Vec::new();
        let mut add = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                q.push(format!("{k}={}", encode(&v)));
            }
        };
        add("direction", self.direction.clone());
        add("authority", self.authority.clone());
        add("path", self.path.clone());
        add("method", self.method.clone());
        add("identity", self.identity.clone());
        add("rate", self.rate.map(|r| r.to_string()));
        add("sample", self.sample.map(|s| s.to_string()));
        q.join("&")
    }
}

/// One event as a person reads it.
pub(crate) fn human(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return line.to_string();
    };
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("-").to_string();
    let n = |k: &str| {
        v.get(k)
            .filter(|x| !x.is_null())
            .map(|x| x.to_string())
            .unwrap_or_else(|| "-".into())
    };
    let latency = v.get("latency_ms").and_then(|x| x.as_f64()).unwrap_or(0.0);
    let mut out = format!(
        "{:<8} {} {} {} status={} grpc={} {latency:.3}ms {}B peer={} endpoint={}",
        s("direction"),
        s("method"),
        s("authority"),
        s("path"),
        n("status"),
        n("grpc_status"),
        n("response_bytes"),
        s("peer_identity"),
        s("endpoint"),
    );
    if v.get("finished").and_then(|f| f.as_bool()) == Some(false) {
        out.push_str(" (cut short)");
    }
    out
}

pub async fn run(a: TapArgs) -> Result<(), String> {
    let target = a.proxy;
    let tcp = tokio::net::TcpStream::connect(target)
        .await
        .map_err(|e| format!("proxy admin {target}: {e}; check the address (REMORA_ADMIN_ADDR, 4191 in an injected pod)"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("proxy admin {target}: {e}"))?;
    tokio::spawn(conn);
    let req = http::Request::get(format!("/tap?{}", a.query()))
        .header(http::header::HOST, target.to_string())
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let rsp = send
        .send_request(req)
        .await
        .map_err(|e| format!("proxy admin {target}: {e}"))?;
    let status = rsp.status();
    let mut body = rsp.into_body();
    if !status.is_success() {
        let text = body
            .collect()
            .await
            .map(|c| String::from_utf8_lossy(&c.to_bytes()).trim().to_string())
            .unwrap_or_default();
        return Err(format!(
            "proxy admin {target} refused tap (HTTP {status}): {text}"
        ));
    }
    let mut pending = Vec::new();
    let mut shown = 0u64;
    use std::io::Write;
    let stdout = std::io::stdout();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("proxy admin {target}: the stream broke: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(i) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            let mut out = stdout.lock();
            let printed = match a.json {
                true => writeln!(out, "{line}"),
                false => writeln!(out, "{}", human(&line)),
            };
            if printed.and_then(|()| out.flush()).is_err() {
                // Standard output closed (`remora tap | head`): done.
                return Ok(());
            }
            shown += 1;
            if a.max.is_some_and(|m| shown >= m) {
                return Ok(());
            }
        }
        // A line is at most a few hundred bytes; anything longer is not tap.
        if pending.len() > 64 * 1024 {
            return Err(format!("proxy admin {target}: not a tap stream"));
        }
    }
    Err(format!(
        "proxy admin {target}: the proxy ended the stream (shutting down?)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_lines() {
        let line = r#"{"ts":1.0,"direction":"inbound","method":"POST","authority":"web:80","path":"/Svc/M","status":200,"grpc_status":14,"latency_ms":1.5,"response_bytes":12,"peer_identity":"spiffe://td/ns/a/sa/b","endpoint":"127.0.0.1:8080","finished":false,"content_type":null,"user_agent":null}"#;
        assert_eq!(
            human(line),
            "inbound  POST web:80 /Svc/M status=200 grpc=14 1.500ms 12B peer=spiffe://td/ns/a/sa/b endpoint=127.0.0.1:8080 (cut short)"
        );
        assert_eq!(human("not json"), "not json");
        assert_eq!(encode("spiffe://td/ns a"), "spiffe%3A//td/ns%20a");
    }
}
