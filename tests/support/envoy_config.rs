//! Shared by tests/api/envoy.rs and benches/suite: runs the repository's own
//! deploy/envoy/envoy.yaml with its ports swapped for free loopback ones.

/// Swaps every `port_value` marked `# port:NAME` for the given port, keeps
/// every listener on loopback, and optionally turns on `encode_raw_headers`.
pub fn test_config(template: &str, ports: &[(&str, u16)], raw_headers: bool) -> String {
    let mut used = vec![false; ports.len()];
    let mut out = String::new();
    for line in template.lines() {
        let mut line = line.replace("address: 0.0.0.0", "address: 127.0.0.1");
        if let Some((_, name)) = line.split_once("# port:") {
            let i = ports
                .iter()
                .position(|(n, _)| *n == name.trim())
                .unwrap_or_else(|| panic!("no test port for {name}"));
            used[i] = true;
            let start = line
                .find("port_value: ")
                .expect("marked line has a port_value")
                + 12;
            let end = start
                + line[start..]
                    .find(|c: char| !c.is_ascii_digit())
                    .expect("port ends");
            line.replace_range(start..end, &ports[i].1.to_string());
        }
        out.push_str(&line);
        out.push('\n');
        if raw_headers && line.trim() == "transport_api_version: V3" {
            let indent = &line[..line.len() - line.trim_start().len()];
            out.push_str(&format!("{indent}encode_raw_headers: true\n"));
        }
    }
    assert!(
        used.iter().all(|u| *u),
        "every port marker is in envoy.yaml: {ports:?}"
    );
    assert!(!raw_headers || out.contains("encode_raw_headers: true"));
    out
}
