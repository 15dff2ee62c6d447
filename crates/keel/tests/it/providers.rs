//! The mock LLM speaks both wire protocols, plain and streamed, to the real
//! provider clients; an Anthropic agent runs end to end on `keel serve`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use keel::mock::Mock;
use keel_core::RunId;
use keel_core::message::Message;
use keel_core::run::State;
use keel_core::spec::Agent;
use keel_engine::llm::{Client, Delta, Error, Finish, Response};

use crate::support::*;

/// An agent of `provider` on the mock, with one tool named `echo`.
fn mock_agent(mock: &Mock, provider: &str, model: &str) -> Agent {
    Agent::parse(
        &agent_yaml("p", mock, model, "echo", "")
            .replace("provider: openai", &format!("provider: {provider}")),
    )
    .expect("agent")
}

/// One answer, plain or streamed; a streamed one must agree with its deltas.
async fn ask(
    client: &Client,
    agent: &Agent,
    state: &State,
    stream: bool,
) -> Result<Response, Error> {
    if !stream {
        return client.complete(agent, state, 1).await;
    }
    let mut deltas = Vec::new();
    let response = client.stream(agent, state, 1, |d| deltas.push(d)).await?;
    let mut text = String::new();
    let mut arguments = vec![String::new(); response.message.tool_calls.len()];
    for delta in deltas {
        match delta {
            Delta::Text(piece) => text.push_str(&piece),
            Delta::ToolCall { index, .. } => assert!(index < arguments.len()),
            Delta::ToolArguments { index, fragment } => arguments[index].push_str(&fragment),
        }
    }
    assert_eq!(
        Some(text).filter(|t| !t.is_empty()),
        response.message.content
    );
    let written: Vec<&str> = response
        .message
        .tool_calls
        .iter()
        .map(|c| c.arguments.as_str())
        .collect();
    assert_eq!(arguments, written);
    Ok(response)
}

#[tokio::test]
async fn mock_llm_speaks_both_protocols_plain_and_streamed() {
    let mock = Mock::start().await.expect("mock");
    let client = Client::new(reqwest::Client::new());
    for provider in ["openai", "anthropic"] {
        for stream in [false, true] {
            let at = format!("{provider}, stream: {stream}");
            let agent = mock_agent(&mock, provider, "tools:2");
            let mut state = State::new(RunId::new());
            state.messages.push(Message::user("go"));
            for k in 1..=2 {
                let response = ask(&client, &agent, &state, stream).await.expect(&at);
                assert_eq!(response.finish, Finish::ToolCalls, "{at}");
                assert_eq!(response.model, "tools:2", "{at}");
                assert!(response.usage.input_tokens > 0 && response.usage.output_tokens > 0);
                let call = response.message.tool_calls[0].clone();
                assert_eq!(call.name, "echo", "{at}");
                assert_eq!(call.arguments, format!("{{\"n\":{k}}}"), "{at}");
                state.messages.push(response.message);
                state.messages.push(Message::tool(call.id, format!("r{k}")));
            }
            let response = ask(&client, &agent, &state, stream).await.expect(&at);
            assert_eq!(response.finish, Finish::Stop, "{at}");
            assert_eq!(
                response.message.content.as_deref(),
                Some("done after 2 tool calls; last result: r2"),
                "{at}"
            );

            // Garbage: arguments that are not JSON (a plain Anthropic answer
            // cannot hold them: an unknown tool instead).
            let junk = mock_agent(&mock, provider, "garbage");
            let mut state = State::new(RunId::new());
            state.messages.push(Message::user("go"));
            let call = ask(&client, &junk, &state, stream)
                .await
                .expect(&at)
                .message
                .tool_calls[0]
                .clone();
            if provider == "anthropic" && !stream {
                assert_eq!(
                    (call.name.as_str(), call.arguments.as_str()),
                    ("no_such_tool", "{}")
                );
            } else {
                assert_eq!(
                    (call.name.as_str(), call.arguments.as_str()),
                    ("echo", "{\"n\": oops"),
                    "{at}"
                );
            }

            // Unknown model: permanent. Provider down: transient.
            let error = ask(
                &client,
                &mock_agent(&mock, provider, "nope"),
                &state,
                stream,
            )
            .await
            .unwrap_err();
            assert!(!error.is_transient(), "{at}: {error}");
            mock.counters.llm_down.store(true, Ordering::Relaxed);
            let error = ask(&client, &agent, &state, stream).await.unwrap_err();
            mock.counters.llm_down.store(false, Ordering::Relaxed);
            assert!(error.is_transient(), "{at}: {error}");
            let status = if provider == "openai" { "503" } else { "529" };
            assert!(error.to_string().contains(status), "{at}: {error}");
        }
    }
}

#[tokio::test]
async fn anthropic_agent_runs_end_to_end() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    let yaml = agent_yaml("claude", &mock, "tools:3", "echo", "")
        .replace("provider: openai", "provider: anthropic");
    register(&http, &server, &yaml).await;
    let id = submit(&http, &server, "claude", "go").await;
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    assert_eq!(
        run["output"],
        "done after 3 tool calls; last result: {\"echo\":{\"n\":3}}"
    );
    assert_eq!(mock.counters.key_counts().len(), 3);
}
