"""The baseline of `vectorpipe-bench compare`: the Kafka -> Bedrock -> OpenSearch loop as it is
usually written in Python, with the libraries people use for it.

A confluent-kafka consumer reads up to --batch records, boto3 calls InvokeModel (Titan v2) for
each from a thread pool of --threads, opensearch-py sends one _bulk request with the documents
(their id the record's "id" field), and the consumer commits synchronously after each bulk, so
no offset is committed before its record is indexed. It runs until --records documents were
indexed, then prints one JSON line with what it did.

usage: python_loop.py --bootstrap HOST:PORT --topic T --group G --bedrock URL --opensearch URL
                      --index I --records N [--threads 64] [--batch 500] [--dimensions 256]
"""

import argparse
import json
import resource
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config
from confluent_kafka import Consumer
from opensearchpy import OpenSearch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--bedrock", required=True)
    parser.add_argument("--opensearch", required=True)
    parser.add_argument("--index", required=True)
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--dimensions", type=int, default=256)
    parser.add_argument("--access-key-id", required=True)
    parser.add_argument("--secret-access-key", required=True)
    args = parser.parse_args()

    bedrock = boto3.client(
        "bedrock-runtime",
        region_name="eu-west-1",
        endpoint_url=args.bedrock,
        aws_access_key_id=args.access_key_id,
        aws_secret_access_key=args.secret_access_key,
        config=Config(
            max_pool_connections=args.threads,
            retries={"max_attempts": 6, "mode": "standard"},
        ),
    )
    search = OpenSearch(hosts=[args.opensearch], timeout=60)
    if not search.indices.exists(index=args.index):
        search.indices.create(
            index=args.index,
            body={
                "settings": {
                    "index": {
                        "knn": True,
                        "number_of_shards": 1,
                        "number_of_replicas": 0,
                        "refresh_interval": "1s",
                    }
                },
                "mappings": {
                    "properties": {
                        "embedding": {
                            "type": "knn_vector",
                            "dimension": args.dimensions,
                            "method": {
                                "name": "hnsw",
                                "engine": "lucene",
                                "space_type": "cosinesimil",
                            },
                        },
                        "text": {"type": "text"},
                    }
                },
            },
        )
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([args.topic])

    def embed(text):
        body = json.dumps({"inputText": text, "dimensions": args.dimensions})
        answer = bedrock.invoke_model(
            modelId="amazon.titan-embed-text-v2:0",
            body=body,
            contentType="application/json",
            accept="application/json",
        )
        return json.loads(answer["body"].read())["embedding"]

    indexed = 0
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        while indexed < args.records:
            messages = consumer.consume(num_messages=args.batch, timeout=1.0)
            records = []
            for message in messages:
                if message.error():
                    continue
                records.append(json.loads(message.value()))
            if not records:
                continue
            vectors = list(pool.map(lambda r: embed(r["text"]), records))
            body = []
            for record, vector in zip(records, vectors):
                body.append({"index": {"_index": args.index, "_id": record["id"]}})
                body.append({"text": record["text"], "embedding": vector})
            answer = search.bulk(body=body)
            if answer.get("errors"):
                raise SystemExit(f"bulk errors: {json.dumps(answer)[:2000]}")
            consumer.commit(asynchronous=False)
            indexed += len(records)
    consumer.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "indexed": indexed,
                "seconds": time.monotonic() - started,
                "cpuSeconds": usage.ru_utime + usage.ru_stime,
                "peakRssMiB": usage.ru_maxrss / 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
