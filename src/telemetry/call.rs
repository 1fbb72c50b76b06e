//! Which caller and RPC the call being served belongs to, for the lines logged while serving it.
//!
//! This is a Tokio task-local, not a `tracing` span. A span per call had to be registered,
//! have its fields formatted by the log layer, and be entered and left on every poll. That
//! cost about 3 µs of the hot path's 45, for the few calls that log anything
//! (docs/benchmarks.md). The log formats read the task-local when, and only when, they write
//! a line. Traces keep the caller as an attribute of the call's server span.

use std::future::Future;
use std::sync::Arc;

tokio::task_local! {
    static CALL: Option<Call>;
}

/// The caller and RPC of a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The configured caller's name (`[[callers]] name`), never its credential.
    pub caller: Arc<str>,
    /// The method name, as in `/session_broker.v1.SessionBroker/GetSession`'s `GetSession`.
    pub rpc: &'static str,
}

/// Runs `fut` as serving `call`: lines logged from it carry the caller and RPC.
pub fn serve<F: Future>(call: Call, fut: F) -> impl Future<Output = F::Output> {
    CALL.scope(Some(call), fut)
}

/// Runs `fut`, usually a task spawned while serving a call, in the current call's context.
/// Outside a call it runs with none.
pub fn carry<F: Future>(fut: F) -> impl Future<Output = F::Output> {
    CALL.scope(current(), fut)
}

/// The call being served by this task, if any.
pub fn current() -> Option<Call> {
    CALL.try_with(Clone::clone).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call() -> Call {
        Call {
            caller: "web-frontend".into(),
            rpc: "GetSession",
        }
    }

    #[tokio::test]
    async fn the_call_is_known_inside_and_carried_into_spawned_tasks() {
        assert_eq!(current(), None);
        let seen = serve(call(), async {
            let inside = current();
            let spawned = tokio::spawn(carry(async { current() }))
                .await
                .expect("task ran");
            let bare = tokio::spawn(async { current() }).await.expect("task ran");
            (inside, spawned, bare)
        })
        .await;
        assert_eq!(seen, (Some(call()), Some(call()), None));
        assert_eq!(carry(async { current() }).await, None);
    }
}
