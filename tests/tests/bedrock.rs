//! The real `aws-sdk-bedrockruntime` client against the fake Bedrock server: signed calls,
//! every model family's wire format, retries of throttling, and errors as typed SDK errors.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use aws_config::retry::RetryConfig;
use aws_credential_types::Credentials;
use aws_sdk_bedrockruntime::Client;
use aws_sdk_bedrockruntime::primitives::Blob;
use aws_sdk_bedrockruntime::types::{ContentBlock, ConversationRole, Message, SystemContentBlock};
use serde_json::{Value, json};
use vectorpipe_tests::bedrock::{self, FakeBedrock, Fault};

async fn client(address: SocketAddr, secret: &str) -> Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region("eu-west-1")
        .credentials_provider(Credentials::new(
            bedrock::ACCESS_KEY_ID,
            secret,
            None,
            None,
            "test",
        ))
        .endpoint_url(format!("http://{address}"))
        // The SDK's standard retry mode, with a short first backoff so the test stays quick.
        .retry_config(RetryConfig::standard().with_initial_backoff(Duration::from_millis(20)))
        .load()
        .await;
    Client::new(&config)
}

async fn invoke(
    client: &Client,
    model: &str,
    body: Value,
) -> Result<Value, aws_sdk_bedrockruntime::Error> {
    let out = client
        .invoke_model()
        .model_id(model)
        .content_type("application/json")
        .accept("application/json")
        .body(Blob::new(body.to_string()))
        .send()
        .await?;
    Ok(serde_json::from_slice(out.body().as_ref()).expect("the fake answers JSON"))
}

#[tokio::test]
async fn the_sdk_gets_titan_embeddings_from_the_fake() -> Result<()> {
    let (fake, address) = FakeBedrock::start().await?;
    let client = client(address, bedrock::SECRET_ACCESS_KEY).await;

    let v2 = invoke(
        &client,
        "amazon.titan-embed-text-v2:0",
        json!({"inputText": "fresh vectors", "dimensions": 256}),
    )
    .await?;
    assert_eq!(v2["embedding"].as_array().map(Vec::len), Some(256));
    assert!(v2["inputTextTokenCount"].as_u64().is_some_and(|n| n > 0));
    let v1 = invoke(
        &client,
        "amazon.titan-embed-text-v1",
        json!({"inputText": "fresh vectors"}),
    )
    .await?;
    assert_eq!(v1["embedding"].as_array().map(Vec::len), Some(1536));

    let stats = fake.stats();
    assert_eq!(
        stats.unsigned, 0,
        "every SDK call carries a valid SigV4 signature"
    );
    assert_eq!(stats.models["amazon.titan-embed-text-v2:0"].succeeded, 1);
    assert_eq!(stats.models["amazon.titan-embed-text-v1"].succeeded, 1);
    Ok(())
}

#[tokio::test]
async fn the_sdk_gets_a_cohere_batch_from_the_fake() -> Result<()> {
    let (fake, address) = FakeBedrock::start().await?;
    let client = client(address, bedrock::SECRET_ACCESS_KEY).await;
    let texts: Vec<String> = (0..96).map(|i| format!("support article {i}")).collect();
    let out = invoke(
        &client,
        "cohere.embed-multilingual-v3",
        json!({"texts": texts, "input_type": "search_document"}),
    )
    .await?;
    assert_eq!(out["response_type"], "embeddings_floats");
    assert_eq!(out["embeddings"].as_array().map(Vec::len), Some(96));
    assert_eq!(
        fake.stats().models["cohere.embed-multilingual-v3"].texts,
        96
    );
    Ok(())
}

#[tokio::test]
async fn the_sdk_retries_throttling_and_then_succeeds() -> Result<()> {
    let (fake, address) = FakeBedrock::start().await?;
    let client = client(address, bedrock::SECRET_ACCESS_KEY).await;
    fake.inject(Fault::ThrottlingException, 1);
    fake.inject(Fault::ServiceUnavailableException, 1);
    let out = invoke(
        &client,
        "amazon.titan-embed-text-v2:0",
        json!({"inputText": "retry me"}),
    )
    .await?;
    assert_eq!(out["embedding"].as_array().map(Vec::len), Some(1024));
    let stats = fake.stats();
    assert_eq!(stats.calls, 3, "two refusals, then the answer");
    assert_eq!(stats.errors.get("ThrottlingException"), Some(&1));
    assert_eq!(stats.errors.get("ServiceUnavailableException"), Some(&1));
    Ok(())
}

#[tokio::test]
async fn refusals_reach_the_sdk_as_typed_errors_and_are_not_retried() -> Result<()> {
    let (fake, address) = FakeBedrock::start().await?;
    let client = client(address, bedrock::SECRET_ACCESS_KEY).await;

    let err = invoke(
        &client,
        "amazon.titan-embed-text-v2:0",
        json!({"inputText": "x", "dimensions": 768}),
    )
    .await
    .expect_err("768 dimensions is not a Titan v2 size");
    assert!(
        matches!(err, aws_sdk_bedrockruntime::Error::ValidationException(_)),
        "{err:?}"
    );

    fake.inject(Fault::ModelTimeoutException, 1);
    let err = invoke(
        &client,
        "amazon.titan-embed-text-v2:0",
        json!({"inputText": "x"}),
    )
    .await
    .expect_err("an injected model timeout");
    assert!(
        matches!(err, aws_sdk_bedrockruntime::Error::ModelTimeoutException(_)),
        "{err:?}"
    );

    fake.inject(Fault::ThrottlingException, 10);
    let err = invoke(
        &client,
        "amazon.titan-embed-text-v2:0",
        json!({"inputText": "x"}),
    )
    .await
    .expect_err("throttling outlasts the SDK's attempts");
    assert!(
        matches!(err, aws_sdk_bedrockruntime::Error::ThrottlingException(_)),
        "{err:?}"
    );

    // 1 validation + 1 timeout (neither retried) + 3 throttled attempts.
    assert_eq!(fake.stats().calls, 5);
    Ok(())
}

#[tokio::test]
async fn a_request_signed_with_the_wrong_secret_is_refused() -> Result<()> {
    let (fake, address) = FakeBedrock::start().await?;
    let client = client(address, "not-the-test-secret").await;
    let err = invoke(
        &client,
        "amazon.titan-embed-text-v2:0",
        json!({"inputText": "x"}),
    )
    .await
    .expect_err("a wrong signature must be refused");
    assert!(
        format!("{err:?}").contains("InvalidSignatureException"),
        "{err:?}"
    );
    assert!(fake.stats().unsigned >= 1);
    assert_eq!(
        fake.stats().calls,
        0,
        "a refused signature never reaches a model"
    );
    Ok(())
}

#[tokio::test]
async fn converse_returns_the_canned_answer() -> Result<()> {
    let (_fake, address) = FakeBedrock::start().await?;
    let client = client(address, bedrock::SECRET_ACCESS_KEY).await;
    let out = client
        .converse()
        .model_id("anthropic.claude-3-haiku-20240307-v1:0")
        .messages(
            Message::builder()
                .role(ConversationRole::User)
                .content(ContentBlock::Text("What changed this week?".into()))
                .build()?,
        )
        .send()
        .await?;
    let text = out
        .output()
        .and_then(|o| o.as_message().ok())
        .and_then(|m| m.content().first())
        .and_then(|c| c.as_text().ok())
        .cloned();
    assert_eq!(text.as_deref(), Some(bedrock::CANNED_ANSWER));
    assert!(out.usage().is_some_and(|u| u.input_tokens() > 0));
    Ok(())
}

/// The fake answers a retrieval prompt as a model told to answer from numbered sources would:
/// it cites the sources that share words with the question, says NOT_FOUND when none does, and
/// refuses models that do not chat.
#[tokio::test]
async fn converse_answers_from_numbered_sources_and_refuses_embedding_models() -> Result<()> {
    let (_fake, address) = FakeBedrock::start().await?;
    let client = client(address, bedrock::SECRET_ACCESS_KEY).await;
    let ask = |model: &'static str, prompt: &'static str| {
        let client = client.clone();
        async move {
            client
                .converse()
                .model_id(model)
                .system(SystemContentBlock::Text("Answer from the sources.".into()))
                .messages(
                    Message::builder()
                        .role(ConversationRole::User)
                        .content(ContentBlock::Text(prompt.into()))
                        .build()?,
                )
                .send()
                .await
                .map_err(anyhow::Error::from)
                .map(|out| {
                    let text = out
                        .output()
                        .and_then(|o| o.as_message().ok())
                        .and_then(|m| m.content().first())
                        .and_then(|c| c.as_text().ok())
                        .cloned()
                        .unwrap_or_default();
                    (text, out.usage().map(|u| u.input_tokens()).unwrap_or(0))
                })
        }
    };
    let claude = "anthropic.claude-3-haiku-20240307-v1:0";
    let (text, input) = ask(
        claude,
        "Sources:\n[1] brokers store partitions\n[2] the weather was sunny\n[3] a consumer group rebalances partitions\n\nQuestion: how are partitions rebalanced in a consumer group?\n",
    )
    .await?;
    assert!(
        text.contains("[3]") && text.contains("[1]") && !text.contains("[2]"),
        "{text}"
    );
    assert!(
        text.find("[3]") < text.find("[1]"),
        "the best source first: {text}"
    );
    assert!(input > 10, "input tokens {input}");
    let (text, _) = ask(
        claude,
        "Sources:\n[1] brokers store partitions\n\nQuestion: will it rain tomorrow?\n",
    )
    .await?;
    assert_eq!(text, bedrock::NOT_FOUND);
    let refused = ask(
        "amazon.titan-embed-text-v2:0",
        "Sources:\n[1] x\n\nQuestion: y\n",
    )
    .await;
    let error = format!("{:?}", refused.unwrap_err());
    assert!(error.contains("doesn't support the model"), "{error}");
    let refused = ask("anthropic-claude", "hello").await;
    assert!(format!("{:?}", refused.unwrap_err()).contains("model identifier is invalid"));
    Ok(())
}
