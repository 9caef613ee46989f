//! The harness OpenSearch node is real and has the k-NN plugin: a knn_vector index is created,
//! its mapping reads back, documents are bulk-indexed, and a k-NN query finds the nearest one.

use anyhow::{Result, ensure};
use opensearch::indices::{IndicesCreateParts, IndicesGetMappingParts};
use opensearch::params::Refresh;
use opensearch::{BulkParts, CountParts, DeleteByQueryParts, SearchParts};
use serde_json::{Value, json};
use vectorpipe_tests::{opensearch as harness, unique_name};

#[tokio::test]
async fn a_knn_index_returns_the_nearest_document() -> Result<()> {
    let client = harness::client()?;
    let index = unique_name("knn");
    let created = client
        .indices()
        .create(IndicesCreateParts::Index(&index))
        .body(json!({
            "settings": {"index": {"knn": true, "number_of_shards": 1, "number_of_replicas": 0}},
            "mappings": {"properties": {
                "embedding": {"type": "knn_vector", "dimension": 4, "method": {
                    "name": "hnsw", "engine": "lucene", "space_type": "l2",
                    "parameters": {"m": 24, "ef_construction": 128}
                }},
                "text": {"type": "text"},
                "parentId": {"type": "keyword"}
            }}
        }))
        .send()
        .await?;
    ensure!(
        created.status_code().is_success(),
        "create: {}",
        created.text().await?
    );

    let mapping: Value = client
        .indices()
        .get_mapping(IndicesGetMappingParts::Index(&[&index]))
        .send()
        .await?
        .json()
        .await?;
    let field = &mapping[&index]["mappings"]["properties"]["embedding"];
    assert_eq!(field["type"], "knn_vector");
    assert_eq!(field["dimension"], 4);
    assert_eq!(field["method"]["space_type"], "l2");

    let docs = [
        ("cats#0", [1.0, 0.0, 0.0, 0.0], "cats sleep", "cats"),
        ("cats#1", [0.9, 0.1, 0.0, 0.0], "cats purr", "cats"),
        (
            "rates",
            [0.0, 0.0, 1.0, 0.0],
            "interest rates rise",
            "rates",
        ),
    ];
    let mut body: Vec<opensearch::BulkOperation<Value>> = Vec::new();
    for (id, vector, text, parent) in docs {
        body.push(
            opensearch::BulkOperation::index(
                json!({"embedding": vector, "text": text, "parentId": parent}),
            )
            .id(id)
            .into(),
        );
    }
    let bulk: Value = client
        .bulk(BulkParts::Index(&index))
        .body(body)
        .refresh(Refresh::True)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(bulk["errors"], false, "{bulk}");
    let statuses: Vec<u64> = bulk["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["index"]["status"].as_u64())
        .collect();
    assert_eq!(statuses, [201, 201, 201]);

    let hits: Value = client
        .search(SearchParts::Index(&[&index]))
        .body(json!({"size": 1, "query": {"knn": {"embedding": {"vector": [0.1, 0.0, 0.9, 0.0], "k": 1}}}}))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(hits["hits"]["hits"][0]["_id"], "rates", "{hits}");

    // Deleting every chunk of one record by its parent id, as a tombstone does.
    let deleted: Value = client
        .delete_by_query(DeleteByQueryParts::Index(&[&index]))
        .body(json!({"query": {"term": {"parentId": "cats"}}}))
        .refresh(true)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(deleted["deleted"], 2, "{deleted}");
    let count: Value = client
        .count(CountParts::Index(&[&index]))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(count["count"], 1);
    Ok(())
}
