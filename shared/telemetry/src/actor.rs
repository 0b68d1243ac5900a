//! Span context through actix mailboxes.
//!
//! An actix message crosses a queue, so the sender's span is no longer "current" when the handler runs.
//! [`Traced`] captures it when the message is created and gives the handler a child span named
//! `{Actor} handle {Message}` with the time the message waited in the mailbox (`actor.mailbox.wait_us`):
//! queueing inside a service is as visible as a slow network hop.
//!
//! [`supervised_reply`] is the whole pattern of a handler: take the message out of its envelope, run the
//! work as a future inside the handler span, and turn a panic into an error answer plus a restart of the
//! actor (under an actix `Supervisor`).
//!
//! ```
//! use actix::prelude::*;
//! use tracehop_telemetry::actor::{Traced, supervised_reply};
//!
//! struct Double(u32);
//! impl Message for Double {
//!     type Result = Result<u32, String>;
//! }
//!
//! struct Doubler;
//! impl Actor for Doubler {
//!     type Context = Context<Self>;
//! }
//! impl Supervised for Doubler {}
//! tracehop_telemetry::restart_on_request!(Doubler);
//!
//! impl Handler<Traced<Double>> for Doubler {
//!     type Result = ResponseFuture<Result<u32, String>>;
//!     fn handle(&mut self, message: Traced<Double>, context: &mut Context<Self>) -> Self::Result {
//!         supervised_reply(
//!             message,
//!             context,
//!             |Double(n)| async move { Ok(n * 2) },
//!             |panic| Err(format!("doubler failed: {panic}")),
//!         )
//!     }
//! }
//!
//! # actix::System::new().block_on(async {
//! let doubler = Supervisor::start(|_| Doubler);
//! // Sent from inside a span, the handler's span `Doubler handle Double` is its child.
//! let answer = doubler.send(Traced::new(Double(21))).await.unwrap();
//! assert_eq!(answer, Ok(42));
//! # });
//! ```

use std::time::Instant;

use actix::Message;
use opentelemetry::Context;

use crate::propagation::set_remote_parent;

/// A message together with the span context of whoever sent it.
pub struct Traced<M> {
    message: M,
    parent: Context,
    enqueued_at: Instant,
}

impl<M: Message> Message for Traced<M> {
    type Result = M::Result;
}

impl<M> Traced<M> {
    /// Wraps `message`, capturing the current span as the parent of the handler's span.
    pub fn new(message: M) -> Self {
        Self::with_parent(
            message,
            crate::propagation::context_of(&tracing::Span::current()),
        )
    }

    /// Wraps `message` with an explicit parent context (a context restored from storage, say).
    pub fn with_parent(message: M, parent: Context) -> Self {
        Self {
            message,
            parent,
            enqueued_at: Instant::now(),
        }
    }

    /// The sender's context.
    pub fn parent(&self) -> &Context {
        &self.parent
    }

    /// Takes the message out and starts the handler span for actor `A`. Call this first thing in `handle`, so
    /// the mailbox wait is measured up to the moment the actor picked the message up.
    pub fn into_parts<A>(self) -> (M, tracing::Span) {
        let actor = short_type_name::<A>();
        let message_type = short_type_name::<M>();
        let waited = self.enqueued_at.elapsed();
        let span = tracing::info_span!(
            "actor.handle",
            otel.name = %format!("{actor} handle {message_type}"),
            otel.kind = "internal",
            otel.status_code = tracing::field::Empty,
            actor.name = actor,
            actor.message.type = message_type,
            actor.mailbox.wait_us = i64::try_from(waited.as_micros()).unwrap_or(i64::MAX),
        );
        set_remote_parent(&span, self.parent);
        (self.message, span)
    }
}

/// A handler's answer for `message`, with the work done by the future `work` makes of it, inside the
/// handler span (see [`Traced::into_parts`]). If the future panics, the actor is asked to restart
/// ([`Restart`]) and the message is answered with `on_panic(panic message)`.
pub fn supervised_reply<A, M, F>(
    message: Traced<M>,
    context: &mut actix::Context<A>,
    work: impl FnOnce(M) -> F,
    on_panic: impl FnOnce(String) -> F::Output + 'static,
) -> actix::ResponseFuture<F::Output>
where
    A: actix::Actor<Context = actix::Context<A>> + actix::Handler<Restart>,
    F: std::future::Future + 'static,
    F::Output: 'static,
{
    use tracing::Instrument;
    let (message, span) = message.into_parts::<A>();
    let me = actix::AsyncContext::address(context);
    let future = work(message);
    Box::pin(async move { reply_or_restart(me, future, on_panic).await }.instrument(span))
}

/// Runs a handler's future and turns a panic into `Err(message)`, recorded as an error on the current
/// (handler) span: one bad message must not take the actor's thread, and the whole service, down with it.
/// The caller answers the in-flight request with an error and sends the actor a [`Restart`].
async fn catch_panic<F: std::future::Future>(future: F) -> Result<F::Output, String> {
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(future)
        .catch_unwind()
        .await
        .map_err(|payload| {
            let message = payload
                .downcast_ref::<&str>()
                .map(|text| (*text).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic with a non-text payload".to_owned());
            tracing::error!(panic = %message, "actor handler panicked");
            message
        })
}

/// The handler side of supervision: runs `future`; if it panics, asks the actor `me` to restart (see
/// [`Restart`]) and answers the in-flight message with `on_panic(message)`.
async fn reply_or_restart<A, T>(
    me: actix::Addr<A>,
    future: impl std::future::Future<Output = T>,
    on_panic: impl FnOnce(String) -> T,
) -> T
where
    A: actix::Actor + actix::Handler<Restart>,
    A::Context: actix::dev::ToEnvelope<A, Restart>,
{
    match catch_panic(future).await {
        Ok(outcome) => outcome,
        Err(panic) => {
            me.do_send(Restart {
                reason: panic.clone(),
            });
            on_panic(panic)
        }
    }
}

/// Asks an actor to stop after a failure; under an actix `Supervisor` that means a restart: actix calls
/// `Supervised::restarting` and starts the *same* instance again, so state it keeps (a circuit breaker's
/// counts) survives, and state it must not keep is reset in `restarting`.
/// Implement it with [`restart_on_request!`](crate::restart_on_request).
#[derive(Debug, Clone, actix::Message)]
#[rtype(result = "()")]
pub struct Restart {
    pub reason: String,
}

/// Implements `Handler<Restart>` for a supervised actor: log (with the trace id of the failed message's
/// span, if any), then stop the context so the supervisor restarts it.
#[macro_export]
macro_rules! restart_on_request {
    ($actor:ty) => {
        impl ::actix::Handler<$crate::actor::Restart> for $actor {
            type Result = ();

            fn handle(&mut self, message: $crate::actor::Restart, context: &mut Self::Context) {
                ::tracing::error!(
                    actor = $crate::actor::short_type_name::<$actor>(),
                    reason = %message.reason,
                    "actor failed; stopping it so its supervisor restarts it"
                );
                ::actix::ActorContext::stop(context);
            }
        }
    };
}

/// `tracehop_billing::actors::BillingActor` -> `BillingActor` (generic arguments dropped).
pub fn short_type_name<T: ?Sized>() -> &'static str {
    let full = std::any::type_name::<T>();
    let without_generics = full.split('<').next().unwrap_or(full);
    without_generics
        .rsplit("::")
        .next()
        .unwrap_or(without_generics)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };

    struct Ping;
    impl Message for Ping {
        type Result = ();
    }
    struct PingActor;

    #[test]
    fn short_names() {
        assert_eq!(short_type_name::<PingActor>(), "PingActor");
        assert_eq!(short_type_name::<Traced<Ping>>(), "Traced");
    }

    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use crate::testing::Keep;

    #[tokio::test]
    async fn into_parts_makes_the_handler_span_a_child_with_its_mailbox_wait() {
        let kept = Keep::default();
        let (dispatch, guard) = crate::setup::dispatch_with_exporter("test", Some(kept.clone()));
        let (sender, handler) = tracing::dispatcher::with_default(&dispatch, || {
            let sender = tracing::info_span!("sender");
            let envelope = sender.in_scope(|| Traced::new(Ping));
            std::thread::sleep(std::time::Duration::from_millis(3));
            let (Ping, handler) = envelope.into_parts::<PingActor>();
            handler.in_scope(|| {});
            (sender.context(), handler.context())
        });
        drop(dispatch);
        guard.shutdown().await;
        let spans = kept.0.lock().unwrap();
        let handled = spans
            .iter()
            .find(|s| s.name == "PingActor handle Ping")
            .expect("the handler span was exported");
        let sender = sender.span().span_context().clone();
        assert_eq!(handled.span_context.trace_id(), sender.trace_id());
        assert_eq!(handled.parent_span_id, sender.span_id());
        assert_eq!(
            handler.span().span_context().span_id(),
            handled.span_context.span_id()
        );
        let wait = handled
            .attributes
            .iter()
            .find(|kv| kv.key.as_str() == "actor.mailbox.wait_us")
            .map(|kv| kv.value.clone());
        match wait {
            Some(opentelemetry::Value::I64(us)) => assert!(us >= 3_000, "waited {us} µs"),
            other => panic!("actor.mailbox.wait_us is an int: {other:?}"),
        }
    }

    #[test]
    fn envelope_carries_the_senders_context() {
        let span_context = SpanContext::new(
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
            SpanId::from_hex("b7ad6b7169203331").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let parent = Context::new().with_remote_span_context(span_context.clone());
        let envelope = Traced::with_parent(Ping, parent);
        assert_eq!(
            envelope.parent().span().span_context().trace_id(),
            span_context.trace_id()
        );
        assert_eq!(
            envelope.parent().span().span_context().span_id(),
            span_context.span_id()
        );
    }
}
