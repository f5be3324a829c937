//! `xgen bench --json`: the fields outside scripts read (the issue's contract), one object per
//! test, and a peak RSS that is the model's (not the bandwidth pass's 1 GiB buffer).

use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_xgen")).arg("bench").args(args).output().expect("run xgen");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

#[test]
fn verify_rows_report_a_cost_ratio_measured_in_the_same_run() {
    let args = "--random-weights tiny --dtype f32 -p 0 -n 0 -d 8 -t 1 -r 3 --verify-rows 1,4 --json";
    let tests = bench(&args.split(' ').collect::<Vec<_>>());
    let names: Vec<&str> = tests.iter().map(|t| t["test"].as_str().unwrap()).collect();
    assert_eq!(names, ["verify 1", "verify 4"]);
    for t in &tests {
        let (one, k) = (t["step_1_ms"].as_f64().unwrap(), t["step_k_ms"].as_f64().unwrap());
        assert!(one > 0.0 && k > 0.0, "{t}");
        assert!((t["cost_ratio"].as_f64().unwrap() - k / one).abs() < 1e-9, "{t}");
        assert_eq!((t["depth"].as_u64(), t["dtype"].as_str()), (Some(8), Some("f32")), "{t}");
    }
    assert_eq!(tests[1]["rows"], 4);
}

#[test]
fn json_has_one_object_per_test_with_the_contract_fields() {
    let tests = bench(&[
        "--random-weights",
        "tiny",
        "--dtype",
        "f32",
        "-p",
        "8",
        "-n",
        "4",
        "-d",
        "8",
        "-t",
        "1",
        "-r",
        "2",
        "--json",
    ]);
    let names: Vec<&str> = tests.iter().map(|t| t["test"].as_str().unwrap()).collect();
    assert_eq!(names, ["pp8", "tg4@d8"]);
    for t in &tests {
        assert_eq!(t["dtype"], "f32");
        assert_eq!(t["threads"], 1);
        assert_eq!(t["repetitions"], 2);
        let (min, median, max) = (
            t["tok_s_min"].as_f64().unwrap(),
            t["tok_s_median"].as_f64().unwrap(),
            t["tok_s_max"].as_f64().unwrap(),
        );
        assert!(0.0 < min && min <= median && median <= max, "{t}");
        assert!(t["weight_bytes"].as_u64().unwrap() > 0);
        // The tiny model and its caches take a few MB; the bandwidth pass's buffer is 1 GiB and
        // must not be counted (it was, before).
        let rss = t["peak_rss_bytes"].as_u64().unwrap();
        assert!(rss > 0 && rss < 1 << 30, "peak RSS {rss}");
    }
    // The prompt test names its kernels and sets its speed against the threads' f32 FMA peak.
    let pp = &tests[0];
    assert_eq!(pp["kernel"], "candle", "f32 weights run candle's gemm: {pp}");
    assert!(["avx512", "avx2", "portable"].contains(&pp["attention_kernel"].as_str().unwrap()), "{pp}");
    let peak = pp["f32_fma_peak_flops"].as_f64().unwrap();
    let ratio = pp["tok_s_median"].as_f64().unwrap() * pp["flops_per_token"].as_f64().unwrap() / peak;
    assert!(peak > 1e8 && (pp["fraction_of_f32_peak"].as_f64().unwrap() - ratio).abs() < 1e-9, "{pp}");
    // tiny: 2 layers of 7 matrices (64 wide, MLP 176) and lm_head [51200, 64]; 2 FLOPs per weight.
    let weights = 2 * (4 * 64 * 64 + 3 * 64 * 176) + 51200 * 64;
    assert_eq!(pp["flops_per_token"].as_f64(), Some(2.0 * weights as f64), "{pp}");
    let tg = &tests[1];
    let floor = tg["floor_tok_s"].as_f64().unwrap();
    let fraction = tg["fraction_of_floor"].as_f64().unwrap();
    assert!((fraction - tg["tok_s_median"].as_f64().unwrap() / floor).abs() < 1e-9, "{tg}");
    // The floor counts the cached keys and values a token reads: f32 KV of 2 layers × K,V × 64
    // values per position, over depth 8 + 4/2 positions.
    assert_eq!(tg["kv_type"], "f32");
    assert_eq!(tg["kv_bytes_per_token"], 2 * 2 * 64 * 4 * (8 + 2));
    let bytes = tg["weight_bytes_per_token"].as_f64().unwrap() + tg["kv_bytes_per_token"].as_f64().unwrap();
    let bandwidth = tg["read_bandwidth_bytes_s"].as_f64().unwrap();
    assert!((floor - bandwidth / bytes).abs() < 1e-9 * floor, "{tg}");
}

#[test]
fn q8_0_kv_cache_is_an_option_where_head_dim_allows() {
    let args: Vec<&str> =
        "-p 0 -n 2 -d 4 -t 1 -r 1 --no-bandwidth --json --kv-type q8_0".split(' ').collect();
    // `small`: head_dim 64.
    let tests = bench(&[&["--random-weights", "small", "--dtype", "f32"][..], &args[..]].concat());
    assert_eq!(tests[0]["kv_type"], "q8_0");
    // `tiny`: head_dim 16, refused with the reason.
    let out = Command::new(env!("CARGO_BIN_EXE_xgen"))
        .args([&["bench", "--random-weights", "tiny", "--dtype", "f32"][..], &args[..]].concat())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--kv-type") && err.contains("head_dim divisible by 32"), "{err}");
}
