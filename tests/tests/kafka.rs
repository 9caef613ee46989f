//! The harness broker is a real Kafka: a record produced is consumed by a consumer group, and the
//! group's committed offset can be read back without joining the group.

use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use vectorpipe_tests::{kafka, unique_name};

#[tokio::test]
async fn a_produced_record_is_consumed_and_its_commit_is_readable() -> Result<()> {
    let topic = unique_name("probe");
    let group = unique_name("probe-group");
    kafka::create_topic(&topic, 2).await?;

    let producer: FutureProducer = kafka::config()?.set("linger.ms", "0").create()?;
    producer
        .send(
            FutureRecord::to(&topic)
                .key("k1")
                .payload(r#"{"id":"1","text":"hello"}"#),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;

    let consumer: StreamConsumer = kafka::config()?
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[&topic])?;
    let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .context("no record within 30 s")??;
    assert_eq!(
        message.payload(),
        Some(&br#"{"id":"1","text":"hello"}"#[..])
    );
    let partition = message.partition();
    let offset = message.offset();
    consumer.commit_message(&message, CommitMode::Sync)?;

    // Read the group's offsets from outside the group, as the scaling controller does.
    let observer: BaseConsumer = kafka::config()?.set("group.id", &group).create()?;
    let mut wanted = TopicPartitionList::new();
    wanted.add_partition(&topic, partition);
    let committed = observer.committed_offsets(wanted, Duration::from_secs(10))?;
    let element = committed
        .find_partition(&topic, partition)
        .context("partition missing from the committed offsets")?;
    assert_eq!(element.offset(), Offset::Offset(offset + 1));
    let (_, high) = observer.fetch_watermarks(&topic, partition, Duration::from_secs(10))?;
    assert_eq!(high, offset + 1, "the one record is the whole partition");
    Ok(())
}
