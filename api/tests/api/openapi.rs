//! `GET /openapi.json` describes what the handlers really do: every documented operation is
//! exercised by a real request whose status is documented and whose body matches the documented
//! schema (required fields present, no undocumented fields, types and enums respected); every
//! operation that declares bearer security answers 401 without a token.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::helpers::TestApp;

both!(the_document_matches_the_handlers);

struct Exercised {
    method: &'static str,
    template: &'static str,
    status: u16,
    body: Option<Value>,
}

async fn call(
    app: &TestApp,
    method: &'static str,
    template: &'static str,
    path: &str,
    user: Option<&crate::helpers::TestUser>,
    body: Option<Value>,
) -> Exercised {
    let mut request = app.client.request(method.parse().unwrap(), app.url(path));
    if let Some(user) = user {
        request = request.bearer_auth(&user.token);
    }
    if let Some(body) = &body {
        request = request.json(body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let is_json =
        response.headers().get("content-type").is_some_and(|v| v.to_str().unwrap().starts_with("application/json"));
    let text = response.text().await.unwrap();
    Exercised { method, template, status, body: is_json.then(|| serde_json::from_str(&text).expect("JSON body")) }
}

async fn the_document_matches_the_handlers(app: TestApp) {
    let response = app.get("/openapi.json", None).await;
    assert_eq!(response.status(), 200);
    let doc: Value = response.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");

    let user = app.user();
    let mut done = Vec::new();
    for (template, path) in [
        ("/health", "/health"),
        ("/ready", "/ready"),
        ("/metrics", "/metrics"),
        ("/openapi.json", "/openapi.json"),
        ("/exchanges", "/exchanges"),
        ("/egress", "/egress"),
        ("/connections", "/connections"),
        ("/connections/audit", "/connections/audit"),
    ] {
        done.push(call(&app, "GET", template, path, Some(&user), None).await);
    }
    let connect = json!({ "exchange": "binance", "api_key": "KEY0001", "api_secret": "s", "nickname": "n" });
    let created = call(&app, "POST", "/connections", "/connections", Some(&user), Some(connect.clone())).await;
    let connection_id = created.body.as_ref().unwrap()["connection"]["id"].as_str().unwrap().to_owned();
    let job_id = created.body.as_ref().unwrap()["job"]["id"].as_str().unwrap().to_owned();
    done.push(created);
    done.push(call(&app, "POST", "/connections/test", "/connections/test", Some(&user), Some(connect)).await);
    app.finish_job(&job_id).await;
    done.push(call(&app, "GET", "/jobs/{id}", &format!("/jobs/{job_id}"), Some(&user), None).await);
    done.push(
        call(
            &app,
            "POST",
            "/connections/{id}/rotate",
            &format!("/connections/{connection_id}/rotate"),
            Some(&user),
            Some(json!({ "api_key": "KEY0002", "api_secret": "t" })),
        )
        .await,
    );
    done.push(call(&app, "GET", "/connections/audit", "/connections/audit?limit=1", Some(&user), None).await);
    let login = call(
        &app,
        "POST",
        "/connections/zerodha/login",
        "/connections/zerodha/login",
        Some(&user),
        Some(json!({ "api_key": "kiteapp", "api_secret": "kitesecret" })),
    )
    .await;
    let state = login.body.as_ref().unwrap()["state"].clone();
    done.push(login);
    done.push(
        call(
            &app,
            "POST",
            "/connections/zerodha/session",
            "/connections/zerodha/session",
            Some(&user),
            Some(json!({ "request_token": "tok", "state": state })),
        )
        .await,
    );
    done.push(
        call(&app, "DELETE", "/connections/{id}", &format!("/connections/{connection_id}"), Some(&user), None).await,
    );
    // Some documented error answers, checked against their schema too.
    done.push(
        call(&app, "DELETE", "/connections/{id}", &format!("/connections/{connection_id}"), Some(&user), None).await,
    );
    done.push(call(&app, "GET", "/jobs/{id}", "/jobs/nope", Some(&user), None).await);

    // Every documented operation was exercised with a success, and nothing undocumented was.
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| ops.as_object().unwrap().keys().map(move |m| (m.to_uppercase(), path.clone())))
        .collect();
    let succeeded: BTreeSet<(String, String)> =
        done.iter().filter(|e| e.status < 300).map(|e| (e.method.to_owned(), e.template.to_owned())).collect();
    assert_eq!(documented, succeeded, "documented operations vs operations that answered 2xx");

    for exercised in &done {
        let op = &doc["paths"][exercised.template][exercised.method.to_lowercase()];
        let response = &op["responses"][exercised.status.to_string()];
        assert!(
            response.is_object(),
            "{} {} answered undocumented {}",
            exercised.method,
            exercised.template,
            exercised.status
        );
        if let Some(body) = &exercised.body {
            let schema = &response["content"]["application/json"]["schema"];
            assert!(
                schema.is_object(),
                "{} {} {}: JSON body without a JSON schema",
                exercised.method,
                exercised.template,
                exercised.status
            );
            let mut problems = Vec::new();
            check(&doc, schema, body, "$", &mut problems);
            assert!(
                problems.is_empty(),
                "{} {} {}: {problems:#?}\nbody: {body}",
                exercised.method,
                exercised.template,
                exercised.status
            );
        }
    }

    // Operations that declare bearer security refuse a request without a token, as documented.
    for (method, template) in &documented {
        let op = &doc["paths"][template][method.to_lowercase()];
        let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
        let path = template.replace("{id}", &uuid::Uuid::new_v4().to_string());
        let response = app.client.request(method.parse().unwrap(), app.url(&path)).send().await.unwrap();
        if secured {
            assert_eq!(response.status(), 401, "{method} {template} without a token");
            assert!(op["responses"]["401"].is_object(), "{method} {template}: 401 undocumented");
        } else {
            assert_ne!(response.status(), 401, "{method} {template} is public");
        }
    }
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference.trim_start_matches("#/components/schemas/");
            resolve(doc, &doc["components"]["schemas"][name])
        }
        None => schema,
    }
}

/// A small JSON Schema check: enough to catch a response that drifted from its document.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    if let Some(alternatives) = schema["oneOf"].as_array().or(schema["anyOf"].as_array()) {
        let fits = alternatives.iter().any(|alt| {
            let mut p = Vec::new();
            check(doc, alt, value, at, &mut p);
            p.is_empty()
        });
        if !fits {
            problems.push(format!("{at}: fits none of {alternatives:?}"));
        }
        return;
    }
    if let Some(all) = schema["allOf"].as_array() {
        for part in all {
            check(doc, part, value, at, problems);
        }
        return;
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if !types.is_empty() {
        let actual = match value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        let ok = types.contains(&actual) || (actual == "integer" && types.contains(&"number"));
        if !ok {
            problems.push(format!("{at}: {actual}, documented {types:?}"));
            return;
        }
    }
    if let (Some(allowed), false) = (schema["enum"].as_array(), value.is_null())
        && !allowed.contains(value)
    {
        problems.push(format!("{at}: {value} not in {allowed:?}"));
    }
    match value {
        Value::Object(map) => {
            if let Some(properties) = schema["properties"].as_object() {
                for required in schema["required"].as_array().into_iter().flatten() {
                    if !map.contains_key(required.as_str().unwrap()) {
                        problems.push(format!("{at}: missing required {required}"));
                    }
                }
                for (key, item) in map {
                    match properties.get(key) {
                        Some(property) => check(doc, property, item, &format!("{at}.{key}"), problems),
                        None => problems.push(format!("{at}: undocumented field {key}")),
                    }
                }
            }
        }
        Value::Array(items) if schema["items"].is_object() => {
            for (i, item) in items.iter().enumerate() {
                check(doc, &schema["items"], item, &format!("{at}[{i}]"), problems);
            }
        }
        _ => {}
    }
}
