//! The CLI as users call it (no privileges needed for these commands).
use std::process::Command;

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_npc-agent"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("run npc-agent")
}

#[test]
fn version_prints() {
    let out = agent(&["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("npc-agent "));
}

#[test]
fn explain_names_the_rule_on_the_sock_shop() {
    let out = agent(&[
        "explain",
        "--manifests",
        "manifests/examples/sock-shop",
        "--from",
        "sock-shop/catalogue",
        "--to",
        "sock-shop/catalogue-db",
        "--port",
        "3306",
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["allowed"], true);
    assert_eq!(v["ingress"]["reason"], "sock-shop/catalogue-db-access ingress[0]");
    assert_eq!(
        v["ingress"]["isolated_by"],
        serde_json::json!([
            "sock-shop/catalogue-db-access",
            "sock-shop/cortex-access",
            "sock-shop/default-deny"
        ])
    );

    let out = agent(&[
        "explain",
        "--manifests",
        "manifests/examples/sock-shop",
        "--from",
        "sock-shop/front-end",
        "--to",
        "sock-shop/catalogue-db",
        "--port",
        "3306",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("TCP/3306: BLOCKED") && text.contains("no rule allows it"),
        "{text}"
    );
}

#[test]
fn explain_rejects_what_it_cannot_answer() {
    let out = agent(&[
        "explain",
        "--manifests",
        "manifests/examples/sock-shop",
        "--from",
        "sock-shop/nope",
        "--to",
        "sock-shop/catalogue",
        "--port",
        "80",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no pod sock-shop/nope"));
    let out = agent(&[
        "explain",
        "--manifests",
        "manifests/examples/sock-shop",
        "--from",
        "x",
        "--to",
        "sock-shop/catalogue",
        "--port",
        "80",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--from"));
}
