//! Dropping a Stream call drops the upstream HTTP request.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use provider_gateway_client::{CallOptions, StreamEvent, request};

use crate::anthropic::text_stream;
use crate::support::{ENV, Gateway, Reply, Step, Upstream, provider_config};

#[tokio::test]
async fn dropping_the_stream_closes_the_upstream_connection() {
    let mut steps = text_stream(&["first"], None);
    steps.push(Step::Stall);
    let upstream = Upstream::start(vec![Reply::sse_steps(steps)]).await;
    let gw = Gateway::start(&provider_config("anthropic", &upstream.url(), ""), ENV).await;
    let mut client = gw.client().await;
    let mut events = client
        .stream(request::user("Hi"), &CallOptions::new())
        .await
        .unwrap();
    assert!(matches!(
        events.next().await,
        Some(Ok(StreamEvent::Start { .. }))
    ));
    assert!(matches!(
        events.next().await,
        Some(Ok(StreamEvent::Usage(_)))
    ));
    assert!(matches!(
        events.next().await,
        Some(Ok(StreamEvent::Text { .. }))
    ));
    assert_eq!(
        upstream.closed_by_peer(),
        0,
        "the upstream is still streaming"
    );

    let dropped = Instant::now();
    drop(events);
    tokio::time::timeout(Duration::from_secs(5), upstream.wait_closed())
        .await
        .expect("the gateway closed the upstream connection after the caller went away");
    let elapsed = dropped.elapsed();
    // The contract is 100 ms; the generous bound keeps a loaded CI machine
    // from flaking while still failing if the request were left open.
    assert!(elapsed < Duration::from_secs(1), "closed after {elapsed:?}");
    eprintln!("upstream connection closed {elapsed:?} after the caller dropped the stream");
}
