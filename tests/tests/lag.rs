//! The operator's lag reader against the real broker: a group that committed part of one
//! partition and nothing of the others.

use std::time::Duration;

use anyhow::Result;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use vectorpipe_crds::v1alpha1::{KafkaSource, StartingOffset};
use vectorpipe_operator::controllers::scaling_policy::lag::{self, LagSummary};
use vectorpipe_tests::{kafka, unique_name};

#[tokio::test(flavor = "multi_thread")]
async fn lag_is_read_per_partition_from_outside_the_group() -> Result<()> {
    let topic = unique_name("lag");
    let group = unique_name("lag-group");
    kafka::create_topic(&topic, 3).await?;
    let producer: FutureProducer = kafka::config()?.create()?;
    for partition in 0..3 {
        for i in 0..10 {
            producer
                .send(
                    FutureRecord::to(&topic)
                        .partition(partition)
                        .key("k")
                        .payload(&format!("{i}")),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)?;
        }
    }
    // The group has processed 4 records of partition 0 and nothing else.
    let committer: BaseConsumer = kafka::config()?.set("group.id", &group).create()?;
    let mut done = TopicPartitionList::new();
    done.add_partition_offset(&topic, 0, Offset::Offset(4))?;
    committer.commit(&done, CommitMode::Sync)?;

    let source: KafkaSource = serde_json::from_value(serde_json::json!({
        "bootstrapServers": [kafka::bootstrap()?],
        "topics": [topic],
    }))?;
    let (source_for_read, group_for_read) = (source.clone(), group.clone());
    let partitions = tokio::task::spawn_blocking(move || {
        lag::read(&source_for_read, &group_for_read, Duration::from_secs(10))
    })
    .await??;
    assert_eq!(partitions.len(), 3);
    assert_eq!(partitions[0].committed, Some(4));
    assert_eq!(partitions[1].committed, None);
    assert_eq!(
        lag::summarize(&partitions, StartingOffset::Earliest),
        LagSummary {
            sum: 26,
            max: 10,
            partitions: 3,
            partitions_with_lag: 3,
            position: 4
        }
    );
    assert_eq!(
        lag::summarize(&partitions, StartingOffset::Latest),
        LagSummary {
            sum: 6,
            max: 6,
            partitions: 3,
            partitions_with_lag: 1,
            position: 24
        }
    );

    // A pattern finds the same topic's three partitions.
    let mut by_pattern = source;
    by_pattern.topics = None;
    by_pattern.topic_pattern = Some(format!("{}.*", &topic[..topic.len() - 4]));
    let found = tokio::task::spawn_blocking(move || {
        lag::read(&by_pattern, &group, Duration::from_secs(10))
    })
    .await??;
    assert_eq!(
        found.iter().filter(|p| p.topic == topic).count(),
        3,
        "{found:?}"
    );
    Ok(())
}

/// The same reader through the broker's SASL/SCRAM-SHA-512 listener, with the credentials the
/// operator reads from the pipeline's Secret; a wrong password is an error, not a panic.
#[tokio::test(flavor = "multi_thread")]
async fn lag_is_read_through_scram_and_bad_credentials_are_reported() -> Result<()> {
    let topic = unique_name("lag-scram");
    kafka::create_topic(&topic, 2).await?;
    let producer: FutureProducer = kafka::config()?.create()?;
    for i in 0..5 {
        producer
            .send(
                FutureRecord::to(&topic)
                    .partition(i % 2)
                    .key("k")
                    .payload("x"),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    let bootstrap = vectorpipe_tests::harness_var("VP_KAFKA_SCRAM_BOOTSTRAP")?;
    let source: KafkaSource = serde_json::from_value(serde_json::json!({
        "bootstrapServers": [bootstrap],
        "topics": [topic],
        "auth": {"scram": {"mechanism": "SHA-512", "secretRef": {"name": "kafka-user"}, "tls": false}},
    }))?;
    let good = lag::KafkaCredentials {
        username: Some(vectorpipe_tests::harness_var("VP_KAFKA_SCRAM_USERNAME")?),
        password: Some(vectorpipe_tests::harness_var("VP_KAFKA_SCRAM_PASSWORD")?),
        ..Default::default()
    };
    let group = unique_name("lag-scram-group");
    let (s, g, c) = (source.clone(), group.clone(), good);
    let partitions = tokio::task::spawn_blocking(move || {
        lag::read_with(&lag::consumer(&s, &g, &c)?, &s, Duration::from_secs(10))
    })
    .await??;
    assert_eq!(
        lag::summarize(&partitions, StartingOffset::Earliest).sum,
        5,
        "{partitions:?}"
    );

    let bad = lag::KafkaCredentials {
        username: Some("vectorpipe".into()),
        password: Some("wrong".into()),
        ..Default::default()
    };
    let failed = tokio::task::spawn_blocking(move || {
        lag::read_with(
            &lag::consumer(&source, &group, &bad)?,
            &source,
            Duration::from_secs(5),
        )
    })
    .await?;
    assert!(failed.is_err(), "a wrong password must not read lag");
    Ok(())
}

/// A topic the reader cannot see is an error naming it, never "no partitions" (which would let
/// a policy scale its pipeline to zero workers).
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_topic_is_an_error_naming_it_never_zero_partitions() -> Result<()> {
    let missing = unique_name("lag-missing");
    let group = unique_name("lag-missing-group");
    let source: KafkaSource = serde_json::from_value(serde_json::json!({
        "bootstrapServers": [kafka::bootstrap()?],
        "topics": [missing],
    }))?;
    let (s, g) = (source.clone(), group.clone());
    let read =
        tokio::task::spawn_blocking(move || lag::read(&s, &g, Duration::from_secs(10))).await?;
    let error = read.expect_err("a missing topic must not read as zero partitions");
    assert!(
        error.to_string().contains(&missing) && error.to_string().contains("does not exist"),
        "{error}"
    );

    let mut by_pattern = source;
    by_pattern.topics = None;
    by_pattern.topic_pattern = Some(format!("{missing}-.*"));
    let read = tokio::task::spawn_blocking(move || {
        lag::read(&by_pattern, &group, Duration::from_secs(10))
    })
    .await?;
    let error = read.expect_err("a pattern matching nothing must not read as zero partitions");
    assert!(error.to_string().contains("no topic matches"), "{error}");
    Ok(())
}
