//! The discovery seam: what a source of endpoints implements ([`Discover`]) and what it sends
//! ([`Update`]). The shape is the control-plane API's (`remora.v1.Discovery.Watch`): a stream
//! per name that starts with a snapshot (or "no such service") and continues with changes.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::mpsc;

use crate::config::EndpointSpec;
pub use remora_certs::Policy;

/// What a caller looks up: a normalised `host:port` authority, or an address (a Service's
/// virtual IP and port, as transparent interception sees it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Target<'a> {
    /// `host:port`, lower case, the port always written (`web.shop:80`).
    Name(&'a str),
    /// An `ip:port` the app addressed: an IP-literal authority (`198.18.0.10:80`, a
    /// Service's ClusterIP), or the original destination of an intercepted connection.
    Addr(SocketAddr),
}

impl std::fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Name(n) => f.write_str(n),
            Target::Addr(a) => write!(f, "{a}"),
        }
    }
}

/// One change to a destination's endpoint set.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Update {
    /// The whole set (the first message, and after a reconnect). May be empty: the destination
    /// exists and has no endpoints, so callers get 503, not DNS.
    Reset(Vec<EndpointSpec>),
    /// Endpoints added, or changed (an address already known is replaced).
    Add(Vec<EndpointSpec>),
    /// Endpoints gone, by address.
    Remove(Vec<SocketAddr>),
    /// This source does not know the name (now): the next source, or DNS, answers instead.
    /// A later `Reset` makes this source the answer again.
    DoesNotExist,
    /// The destination's traffic policy (timeout, retries, failure accrual), replacing the
    /// previous one; `Reset`, `Add` and `Remove` keep it, `DoesNotExist` clears it. Send it
    /// *before* the `Reset` it goes with, so the first requests see both. Boxed: a policy is
    /// far larger than the other updates and rare.
    Policy(Box<Policy>),
}

/// A source of endpoints: static configuration, the control plane, a file, or the embedding
/// application's own registry.
///
/// Sources are asked in order (the builder's order; static destinations first). For each name
/// a source returns `None` when it will never know it, or a stream of [`Update`]s. The first
/// source whose stream says the name exists is used; a source that has not answered within
/// 3 s is skipped until it does. A stream is dropped when its name has been idle (unused by
/// requests) for the discovery idle timeout, so a source can end its work when
/// [`UpdateSender::closed`] resolves.
///
/// ```
/// use remora_proxy::discover::{Discover, Target, Update, Updates};
/// use remora_proxy::EndpointSpec;
///
/// /// Knows one name, with one endpoint that never changes.
/// struct One(EndpointSpec);
///
/// impl Discover for One {
///     fn resolve(&self, target: Target<'_>) -> Option<Updates> {
///         match target {
///             Target::Name("billing.internal:80") => {
///                 Some(Updates::once(Update::Reset(vec![self.0.clone()])))
///             }
///             _ => None,
///         }
///     }
/// }
/// ```
pub trait Discover: Send + Sync + 'static {
    /// Starts following `target`; `None`: not this source's name, ask the next one.
    fn resolve(&self, target: Target<'_>) -> Option<Updates>;
}

/// A stream of updates for one name.
pub struct Updates(Pin<Box<dyn Stream<Item = Update> + Send>>);

impl Updates {
    /// Wraps any stream. When it ends, the last endpoints it sent keep serving.
    pub fn new(stream: impl Stream<Item = Update> + Send + 'static) -> Self {
        Updates(Box::pin(stream))
    }

    /// One update, then nothing more (the answer never changes).
    pub fn once(update: Update) -> Self {
        Updates::new(futures_util::stream::iter([update]).chain(futures_util::stream::pending()))
    }

    /// A channel: a task (or callback) of the source sends updates as they happen. `capacity`
    /// bounds how many updates wait for the proxy before `send` waits.
    pub fn channel(capacity: usize) -> (UpdateSender, Updates) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let stream =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|u| (u, rx)) },
            );
        (UpdateSender(tx), Updates::new(stream))
    }
}

use futures_util::StreamExt as _;

impl Stream for Updates {
    type Item = Update;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Update>> {
        self.0.as_mut().poll_next(cx)
    }
}

/// The sending half of [`Updates::channel`].
#[derive(Clone)]
pub struct UpdateSender(mpsc::Sender<Update>);

/// The proxy no longer follows the name (it went idle, or the proxy stopped).
#[derive(Debug, thiserror::Error)]
#[error("the proxy stopped following this name")]
pub struct Closed;

impl UpdateSender {
    /// Sends one update, waiting while the proxy has not taken the previous ones.
    pub async fn send(&self, update: Update) -> Result<(), Closed> {
        self.0.send(update).await.map_err(|_| Closed)
    }

    /// Resolves when the proxy has dropped the stream: stop watching the name.
    pub async fn closed(&self) {
        self.0.closed().await
    }
}
