//! The same key and usage operations against SQLite and a real PostgreSQL server.

use capy_db::testing::Postgres;
use capy_db::{Db, Error, GroupBy, KeyUpdate, Limits, NewKey, UsageFilter, UsageRecord};

fn row(key: Option<&str>, model: &str, t: i64, p: i64, c: i64, status: i64) -> UsageRecord {
    UsageRecord {
        time_ms: t,
        key_id: key.map(str::to_string),
        model: Some(model.into()),
        endpoint: "/v1/chat/completions".into(),
        prompt_tokens: p,
        cached_tokens: p / 2,
        completion_tokens: c,
        status,
        ttft_ms: (status == 200).then_some(12.5),
        latency_ms: 100.0,
        disconnected: status == 499,
        replica: "r1".into(),
    }
}

/// Runs every operation; returns the secret of a key it created.
async fn exercise(url: &str) -> String {
    let db = Db::open(url).await.unwrap();
    // opening again runs no migration twice
    let db2 = Db::open(url).await.unwrap();
    assert_eq!(db.keys_version().await.unwrap(), (0, 0));

    let (a, secret) = db
        .create_key(&NewKey {
            name: "team-a".into(),
            limits: Limits {
                rpm: Some(60),
                tokens_per_day: Some(1000),
                ..Limits::default()
            },
            models: Some(vec!["smollm2-135m".into()]),
            ..NewKey::default()
        })
        .await
        .unwrap();
    assert!(secret.starts_with("capy-") && secret.len() == 48);
    assert_eq!(a.secret_hash, capy_db::hash_secret(&secret));
    assert_eq!(a.secret_prefix, &secret[..9]);
    assert!(a.allows("smollm2-135m") && !a.allows("gemma3-270m"));
    assert_eq!(a.tenant_id(), a.id);
    assert!(matches!(
        db2.create_key(&NewKey {
            name: "team-a".into(),
            ..NewKey::default()
        })
        .await,
        Err(Error::KeyExists(_))
    ));
    assert!(matches!(
        db.create_key(&NewKey {
            name: "bad".into(),
            limits: Limits {
                rpm: Some(0),
                ..Limits::default()
            },
            ..NewKey::default()
        })
        .await,
        Err(Error::Invalid(_))
    ));
    let (b, _) = db
        .create_key(&NewKey {
            name: "admin".into(),
            admin: true,
            tenant: Some("shared".into()),
            ..NewKey::default()
        })
        .await
        .unwrap();
    assert_eq!(b.tenant_id(), "shared");
    let v1 = db.keys_version().await.unwrap();
    assert_eq!(v1, (2, 2));
    assert!(matches!(
        db.create_key(&NewKey {
            name: "late".into(),
            expires_at: Some(1_000_000),
            ..NewKey::default()
        })
        .await,
        Err(Error::Invalid(_))
    ));
    // concurrent updates of different fields all land
    let (u1, u2): (KeyUpdate, KeyUpdate) = (
        serde_json::from_str(r#"{"rpm": 7}"#).unwrap(),
        serde_json::from_str(r#"{"tpm": 700}"#).unwrap(),
    );
    let (x, y) = tokio::join!(db.update_key("admin", &u1), db2.update_key("admin", &u2));
    x.unwrap();
    y.unwrap();
    let adm = db.key("admin").await.unwrap().unwrap();
    assert_eq!((adm.limits.rpm, adm.limits.tpm), (Some(7), Some(700)));
    assert!(adm.admin && adm.tenant.as_deref() == Some("shared"));

    // updates: set, clear, keep
    let u: KeyUpdate =
        serde_json::from_str(r#"{"rpm": null, "tpm": 5000, "models": null}"#).unwrap();
    let a2 = db.update_key("team-a", &u).await.unwrap();
    assert_eq!(a2.limits.rpm, None);
    assert_eq!(a2.limits.tpm, Some(5000));
    assert_eq!(a2.limits.tokens_per_day, Some(1000));
    assert_eq!(a2.models, None);
    assert_eq!(db2.key("team-a").await.unwrap().unwrap(), a2);
    let v2 = db.keys_version().await.unwrap();
    assert!(v2.0 > v1.0, "{v1:?} {v2:?}");
    assert!(matches!(
        db.update_key("nobody", &KeyUpdate::default()).await,
        Err(Error::NoSuchKey(_))
    ));

    // revocation is seen by another connection, and bumps the version
    let r = db.revoke_key("team-a").await.unwrap();
    assert!(r.revoked_at.is_some() && !r.active(0));
    assert!(db2.keys_version().await.unwrap().0 > v2.0);
    assert!(matches!(
        db.revoke_key("team-a").await,
        Err(Error::Revoked(_))
    ));
    assert!(matches!(
        db.revoke_key("nobody").await,
        Err(Error::NoSuchKey(_))
    ));
    let keys = db2.keys().await.unwrap();
    assert_eq!(
        keys.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
        ["admin", "team-a"]
    );

    // usage: rows, totals by key, model and day, budgets' sums
    let day = capy_db::time::parse_date("2026-11-30").unwrap() * 1000;
    let rows = vec![
        row(Some(&a.id), "smollm2-135m", day + 1000, 10, 5, 200),
        row(Some(&a.id), "smollm2-135m", day + 2000, 20, 7, 200),
        row(Some(&b.id), "gemma3-270m", day + 3000, 30, 0, 429),
        row(Some(&a.id), "gemma3-270m", day + 86_400_000, 40, 3, 499),
        row(None, "smollm2-135m", day + 86_400_001, 1, 1, 200),
    ];
    db.insert_usage(&rows[..2], false).await.unwrap();
    db2.insert_usage(&rows[2..], false).await.unwrap();
    let all = db
        .usage_records(&UsageFilter::default(), 100)
        .await
        .unwrap();
    assert_eq!(all, rows);
    let by_key = db
        .usage_totals(&UsageFilter::default(), GroupBy::Key)
        .await
        .unwrap();
    let g: Vec<(&str, i64, i64, i64)> = by_key
        .iter()
        .map(|t| {
            (
                t.group.as_str(),
                t.requests,
                t.prompt_tokens,
                t.completion_tokens,
            )
        })
        .collect();
    assert_eq!(
        g,
        [
            ("(no key)", 1, 1, 1),
            ("admin", 1, 30, 0),
            ("team-a", 3, 70, 15)
        ]
    );
    let team_a = &by_key[2];
    assert_eq!((team_a.errors, team_a.disconnected), (1, 1));
    assert_eq!(team_a.cached_tokens, 5 + 10 + 20);
    assert_eq!(team_a.mean_ttft_ms, Some(12.5));
    let by_day = db
        .usage_totals(
            &UsageFilter {
                key: Some("team-a".into()),
                ..UsageFilter::default()
            },
            GroupBy::Day,
        )
        .await
        .unwrap();
    assert_eq!(
        by_day
            .iter()
            .map(|t| (t.group.as_str(), t.requests))
            .collect::<Vec<_>>(),
        [("2026-11-30", 2), ("2026-12-01", 1)]
    );
    let by_model = db
        .usage_totals(
            &UsageFilter {
                model: Some("gemma3-270m".into()),
                since_ms: Some(day + 2500),
                ..UsageFilter::default()
            },
            GroupBy::Model,
        )
        .await
        .unwrap();
    assert_eq!(by_model.len(), 1);
    assert_eq!((by_model[0].requests, by_model[0].prompt_tokens), (2, 70));
    assert!(matches!(
        db.usage_totals(
            &UsageFilter {
                key: Some("nobody".into()),
                ..UsageFilter::default()
            },
            GroupBy::Key
        )
        .await,
        Err(Error::NoSuchKey(_))
    ));
    // daily totals: from the day of `day` on, and from the next day on
    let mut since = db.tokens_from_day(day / 86_400_000).await.unwrap();
    since.sort();
    let mut want = vec![(a.id.clone(), 15 + 27 + 43), (b.id.clone(), 30)];
    want.sort();
    assert_eq!(since, want);
    let since = db.tokens_from_day(day / 86_400_000 + 1).await.unwrap();
    let mut want = vec![(a.id.clone(), 43)];
    want.sort();
    assert_eq!(since, want);

    // the database holds no secret
    let dump = format!(
        "{:?}{:?}",
        db.keys().await.unwrap(),
        db.usage_records(&UsageFilter::default(), 100)
            .await
            .unwrap()
    );
    assert!(!dump.contains(&secret[9..]));
    db.close().await;
    db2.close().await;
    secret
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_usage_on_sqlite() {
    let dir = std::env::temp_dir().join(format!("capy-db-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let url = capy_db::default_url(&dir.join("home"));
    let secret = exercise(&url).await;
    // the files hold no secret either (checked on the raw bytes)
    let body = &secret.as_bytes()[9..];
    for f in ["capy.db", "capy.db-wal"] {
        let bytes = std::fs::read(dir.join("home").join(f)).unwrap_or_default();
        assert!(!bytes.windows(body.len()).any(|w| w == body), "{f}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_usage_on_postgres() {
    let pg = Postgres::start().expect("PostgreSQL (apt-get install postgresql)");
    let url = pg.database("capy_test").unwrap();
    exercise(&url).await;

    // shared windows: two "replicas" admitting at once never take more than the limit
    let (a, b) = (Db::open(&url).await.unwrap(), Db::open(&url).await.unwrap());
    let t = 1_000_000_000;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let db = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            db.admit_shared("k1", t + i % 2, Some(60), None)
                .await
                .unwrap()
        }));
    }
    let mut admitted = 0;
    for task in tasks {
        admitted += usize::from(task.await.unwrap().admitted);
    }
    assert_eq!(admitted, 60);
    // no place until a minute after the first admitted; tokens count against tpm
    let w = a
        .admit_shared("k1", t + 59_999, Some(60), None)
        .await
        .unwrap();
    assert!(
        !w.admitted && w.requests == 60 && w.oldest_request_ms == Some(t),
        "{w:?}"
    );
    let w = a
        .admit_shared("k1", t + 60_001, Some(60), None)
        .await
        .unwrap();
    assert!(w.admitted && w.requests < 60, "{w:?}");
    let mut rec = row(Some("k2"), "m", t, 30, 20, 200);
    rec.latency_ms = 5.0;
    a.insert_usage(&[rec], true).await.unwrap();
    let w = b.admit_shared("k2", t + 10, None, Some(50)).await.unwrap();
    assert!(
        !w.admitted && w.tokens == 50 && w.oldest_token_ms == Some(t + 5),
        "{w:?}"
    );
    a.prune_rate_events(t + 70_000).await.unwrap();
    let w = b.admit_shared("k2", t + 20, None, Some(50)).await.unwrap();
    assert!(w.admitted && w.tokens == 0, "{w:?}");
    // SQLite has no shared windows
    let dir = std::env::temp_dir().join(format!("capy-db-shared-{}", std::process::id()));
    let lite = Db::open(&capy_db::default_url(&dir)).await.unwrap();
    assert!(lite.admit_shared("k", t, Some(1), None).await.is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_and_unreachable_databases_are_clear_errors() {
    for url in ["sqlite::memory:", "sqlite:", "sqlite://x.db?mode=memory"] {
        let e = Db::open(url).await.unwrap_err().to_string();
        assert!(e.contains("in-memory"), "{url}: {e}");
    }
    let e = Db::open("sqlite:///nonexistent-capy-dir/sub/x.db")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no directory"), "{e}");
    assert!(!std::path::Path::new("/nonexistent-capy-dir").exists());
    let e = Db::open("mysql://x@y/z").await.unwrap_err().to_string();
    assert!(e.contains("unsupported database URL"), "{e}");
    let e = Db::open("postgres://capy:secret@127.0.0.1:1/capy")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot open") && !e.contains("secret"), "{e}");
}
