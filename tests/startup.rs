//! Startup refusals (SPEC sections 3-4): `divkey check` and `divkey serve` refuse, with one
//! `divkey: error:` line and a nonzero exit, every bad token, PIN, master key and config; and
//! the key tools (`keys generate|import|list`, `check`, `token-hash`) do what SPEC section 4 says.
//!
//! Only `malformed_master_keys_are_refused` uses PKCS#11 in this process (to create keys the
//! CLI would refuse to create); every other test runs divkey as a child process.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

const TEMPLATE_UUID: &str = "6d1a3c5e-0b7f-4a8e-9c2d-3f4e5a6b7c8d";
const DES3_DEFAULT: &str = "010203040506070801020304050607080102030405060708";
const AES128_DEFAULT: &str = "00112233445566778899aabbccddeeff";
const WRONG_PIN: &str = "wrong-user-pin-0042";

// ---------------------------------------------------------------------------------------
// Helpers

/// A `[[profile_template]]` deriving des3 keys with SP 800-108 from `master`.
fn sp800_template(master: &str) -> String {
    format!(
        r#"[[profile_template]]
uuid = "{TEMPLATE_UUID}"
name = "Base CSP"
algorithm = "sp800-108-cmac"
key_type = "des3"
master_key = "{master}"
default_admin_key_hex = "{DES3_DEFAULT}"
"#
    )
}

/// A `[[profile_template]]` using `an10922-aes128` with `master`.
fn an10922_aes128_template(master: &str) -> String {
    format!(
        r#"[[profile_template]]
uuid = "0b6f1c2d-3e4f-4a5b-8c6d-7e8f9a0b1c2d"
name = "DESFire AES"
algorithm = "an10922-aes128"
system_id = "0102030405"
master_key = "{master}"
default_admin_key_hex = "{AES128_DEFAULT}"
"#
    )
}

fn write_config(token: &TestToken, name: &str, text: &str) -> PathBuf {
    let path = token.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A config for `token` with `rest` appended (templates, callers).
fn config(token: &TestToken, name: &str, rest: &str) -> PathBuf {
    write_config(token, name, &config_text(token, "127.0.0.1:0", rest))
}

/// `divkey check` refuses: nonzero exit, one error line naming `needles`, no "ok", no secret.
fn assert_check_refuses(token: &TestToken, config: &Path, needles: &[&str], secrets: &[&str]) {
    let (code, out, err) = run_divkey(token, &["check", "--config", p(config)]);
    let what = format!("check {}", config.display());
    assert_ne!(code, 0, "{what} succeeded:\n{out}{err}");
    assert!(!out.contains("ok"), "{what} printed ok:\n{out}");
    assert_one_error_line(&what, &err, needles);
    assert_no_secret(&what, &out, secrets);
    assert_no_secret(&what, &err, secrets);
}

fn assert_both_refuse(token: &TestToken, config: &Path, needles: &[&str]) {
    assert_check_refuses(token, config, needles, &[USER_PIN]);
    assert_serve_refuses(token, config, needles, &[USER_PIN]);
}

fn generate(
    token: &TestToken,
    config: &Path,
    label: &str,
    key_type: &str,
) -> (i32, String, String) {
    run_divkey(
        token,
        &[
            "keys",
            "generate",
            "--config",
            p(config),
            "--label",
            label,
            "--type",
            key_type,
        ],
    )
}

/// Generates a key and returns its KCV.
fn generate_ok(token: &TestToken, config: &Path, label: &str, key_type: &str) -> String {
    let (code, out, err) = generate(token, config, label, key_type);
    assert_eq!(code, 0, "generate {label}:\n{out}{err}");
    assert!(out.contains(&format!("label={label}")), "{out}");
    assert!(out.contains(&format!("type={key_type}")), "{out}");
    assert_no_secret("generate", &format!("{out}{err}"), &[USER_PIN]);
    let kcv = field(&out, "kcv=").unwrap_or_else(|| panic!("no kcv= in {out}"));
    assert_kcv_format(&kcv);
    kcv
}

/// The value after `prefix` in the first whitespace-separated word starting with it.
fn field(text: &str, prefix: &str) -> Option<String> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix))
        .map(str::to_owned)
}

fn assert_kcv_format(kcv: &str) {
    assert_eq!(kcv.len(), 6, "KCV {kcv:?}");
    assert!(
        kcv.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)),
        "KCV {kcv:?} is not 6 upper-case hex digits"
    );
}

/// One row of `keys list`.
#[derive(Debug)]
struct ListedKey {
    key_type: String,
    bits: u32,
    kcv: String,
    sensitive: String,
    extractable: String,
}

fn list_keys(token: &TestToken, config: &Path) -> Vec<(String, ListedKey)> {
    let (code, out, err) = run_divkey(token, &["keys", "list", "--config", p(config)]);
    assert_eq!(code, 0, "keys list:\n{out}{err}");
    assert_no_secret("keys list", &out, &[USER_PIN]);
    let mut lines = out.lines();
    let header = lines.next().expect("keys list header");
    for col in [
        "LABEL",
        "VERSION",
        "TYPE",
        "BITS",
        "KCV",
        "SENSITIVE",
        "EXTRACTABLE",
    ] {
        assert!(header.contains(col), "header lacks {col}: {header}");
    }
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // LABEL VERSION TYPE BITS KCV SENSITIVE EXTRACTABLE
            assert_eq!(cols.len(), 7, "keys list row: {l}");
            (
                cols[0].to_owned(),
                ListedKey {
                    key_type: cols[2].to_owned(),
                    bits: cols[3].parse().unwrap(),
                    kcv: cols[4].to_owned(),
                    sensitive: cols[5].to_owned(),
                    extractable: cols[6].to_owned(),
                },
            )
        })
        .collect()
}

fn listed(token: &TestToken, config: &Path, label: &str) -> Option<ListedKey> {
    list_keys(token, config)
        .into_iter()
        .find(|(l, _)| l == label)
        .map(|(_, k)| k)
}

fn assert_listed_master(token: &TestToken, config: &Path, label: &str, bits: u32, kcv: &str) {
    let k = listed(token, config, label).unwrap_or_else(|| panic!("{label} not listed"));
    assert!(k.key_type.contains("AES"), "{label}: {k:?}");
    assert_eq!(k.bits, bits, "{label}: {k:?}");
    assert_eq!(k.kcv, kcv, "{label}: {k:?}");
    assert_eq!(k.sensitive, "true", "{label}: {k:?}");
    assert_eq!(k.extractable, "false", "{label}: {k:?}");
}

fn import_args<'a>(
    config: &'a Path,
    label: &'a str,
    key_type: &'a str,
    components: &'a [String],
    kcv: Option<&'a str>,
) -> Vec<&'a str> {
    let mut args = vec![
        "keys",
        "import",
        "--config",
        p(config),
        "--label",
        label,
        "--type",
        key_type,
    ];
    for c in components {
        args.extend(["--component", c.as_str()]);
    }
    if let Some(k) = kcv {
        args.extend(["--kcv", k]);
    }
    args
}

fn xor_all(components: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![0u8; components[0].len()];
    for c in components {
        out.iter_mut().zip(c).for_each(|(o, b)| *o ^= b);
    }
    out
}

/// Every clear form of the key material of an import: the components and their XOR.
fn key_secrets(components: &[Vec<u8>]) -> Vec<String> {
    let mut s: Vec<String> = components.iter().map(hex::encode).collect();
    if components.iter().all(|c| c.len() == components[0].len()) {
        s.push(hex::encode(xor_all(components)));
    }
    s.push(USER_PIN.to_owned());
    s
}

/// A KCV that differs from `kcv`.
fn other_kcv(kcv: &str) -> String {
    let first = u8::from_str_radix(&kcv[..1], 16).unwrap();
    format!("{:X}{}", first ^ 0x5, &kcv[1..])
}

// ---------------------------------------------------------------------------------------
// A. Startup refusals

#[test]
fn unknown_token_label_is_refused() {
    let token = TestToken::new();
    let text = config_text(&token, "127.0.0.1:0", "").replace(
        &format!("token_label = \"{}\"", token.label),
        "token_label = \"no-such-token\"",
    );
    assert!(text.contains("no-such-token"));
    let cfg = write_config(&token, "unknown-token.toml", &text);
    assert_both_refuse(&token, &cfg, &["no-such-token"]);
    // The existing token is named, to help the operator.
    let (_, _, err) = run_divkey(&token, &["check", "--config", p(&cfg)]);
    assert!(err.contains(&token.label), "{err}");
}

#[test]
fn duplicate_token_label_is_refused() {
    let token = TestToken::new();
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &token.conf)
        .args(["--init-token", "--free", "--label", &token.label])
        .args(["--pin", USER_PIN, "--so-pin", SO_PIN])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = config(&token, "divkey.toml", "");
    assert_both_refuse(&token, &cfg, &[&token.label, "2 tokens"]);
}

#[test]
fn wrong_pin_is_refused_once_and_does_not_lock_the_token() {
    let token = TestToken::new();
    let good = config(&token, "good.toml", &sp800_template("admin-master"));
    generate_ok(&token, &good, "admin-master", "aes256");

    let wrong_pin_file = token.path().join("wrong.pin");
    write_private(&wrong_pin_file, WRONG_PIN);
    let text = config_text(&token, "127.0.0.1:0", &sp800_template("admin-master")).replace(
        &token.pin_file.display().to_string(),
        &wrong_pin_file.display().to_string(),
    );
    let bad = write_config(&token, "wrong-pin.toml", &text);
    let secrets = [USER_PIN, WRONG_PIN];
    assert_check_refuses(&token, &bad, &["PIN"], &secrets);
    assert_serve_refuses(&token, &bad, &["PIN"], &secrets);
    let (code, out, err) = run_divkey(&token, &["keys", "list", "--config", p(&bad)]);
    assert_ne!(code, 0, "keys list with a wrong PIN:\n{out}{err}");
    assert_one_error_line("keys list (wrong PIN)", &err, &["PIN"]);
    assert_no_secret("keys list (wrong PIN)", &format!("{out}{err}"), &secrets);

    // Each refusal above made exactly one C_Login: count them through OpenSC's PKCS#11 spy
    // when it is installed.
    login_attempts_through_spy(&token, &bad);

    // The token is not locked: the right PIN still works, for check and for serve.
    assert_check_ok(&token, &good);
    let server = Server::start(&token, &good);
    let log = server.stop();
    assert_no_secret("serve (right PIN)", &log, &secrets);
}

/// Runs `divkey check` and `divkey serve` through OpenSC's pkcs11-spy (when installed) and
/// asserts that each refused after exactly one C_Login.
fn login_attempts_through_spy(token: &TestToken, config: &Path) {
    let spy = [
        "/usr/lib/x86_64-linux-gnu/pkcs11-spy.so",
        "/usr/lib/pkcs11-spy.so",
    ]
    .into_iter()
    .find(|s| Path::new(s).exists());
    let Some(spy) = spy else {
        eprintln!("pkcs11-spy not installed: C_Login count not checked");
        return;
    };
    let text = std::fs::read_to_string(config)
        .unwrap()
        .replace(SOFTHSM_MODULE, spy);
    let spied = write_config(token, "spied.toml", &text);
    for command in ["check", "serve"] {
        let spy_log = token.path().join(format!("spy-{command}.log"));
        let mut child = Command::new(divkey_bin())
            .env("SOFTHSM2_CONF", &token.conf)
            .env("PKCS11SPY", SOFTHSM_MODULE)
            .env("PKCS11SPY_OUTPUT", &spy_log)
            .args([command, "--config", p(&spied)])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{command} through pkcs11-spy did not exit");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let what = format!("{command} through pkcs11-spy");
        assert_ne!(out.status.code(), Some(0), "{what} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_one_error_line(&what, &stderr, &["PIN"]);
        assert_no_secret(&what, &stderr, &[USER_PIN, WRONG_PIN]);
        let log = std::fs::read_to_string(&spy_log).expect("spy log");
        let logins = log.lines().filter(|l| l.contains("C_Login")).count();
        assert_eq!(
            logins, 1,
            "{what}: C_Login was called {logins} times:\n{log}"
        );
    }
}

#[test]
fn missing_master_key_is_refused() {
    let token = TestToken::new();
    let cfg = config(&token, "missing.toml", &sp800_template("absent-master"));
    assert_both_refuse(&token, &cfg, &["absent-master", "not found"]);
}

/// One AES secret key as the test creates it, bypassing divkey's own checks.
struct RawKey {
    label: &'static str,
    value: Vec<u8>,
    sensitive: bool,
    extractable: bool,
    sign: bool,
    derive: bool,
}

impl RawKey {
    fn good(label: &'static str, value: Vec<u8>) -> Self {
        Self {
            label,
            value,
            sensitive: true,
            extractable: false,
            sign: true,
            derive: false,
        }
    }

    fn template(&self) -> Vec<Attribute> {
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(self.sensitive),
            Attribute::Extractable(self.extractable),
            Attribute::Sign(self.sign),
            Attribute::Verify(false),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Derive(self.derive),
            Attribute::Label(self.label.as_bytes().to_vec()),
            Attribute::Value(self.value.clone()),
        ]
    }
}

/// Creates `keys` on `token` through cryptoki, in this process. Call from ONE test only: the
/// PKCS#11 module state is per process and SoftHSM2 reads SOFTHSM2_CONF at C_Initialize.
fn create_raw_keys(token: &TestToken, keys: &[RawKey]) {
    // SAFETY: only this test touches SOFTHSM2_CONF in this process and reads it (through
    // SoftHSM2's C_Initialize) on this thread; the other tests give it to their children
    // through Command::env, and std serialises its own environment access.
    unsafe { std::env::set_var("SOFTHSM2_CONF", &token.conf) };
    let ctx = Pkcs11::new(SOFTHSM_MODULE).expect("load SoftHSM2");
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == token.label)
        .expect("the test token's slot");
    {
        let session = ctx.open_rw_session(slot).unwrap();
        session
            .login(UserType::User, Some(&AuthPin::from(USER_PIN)))
            .expect("login");
        for k in keys {
            session
                .create_object(&k.template())
                .unwrap_or_else(|e| panic!("create {}: {e}", k.label));
        }
        session.logout().unwrap();
    }
    ctx.finalize().unwrap();
}

#[test]
fn malformed_master_keys_are_refused() {
    let token = TestToken::new();
    let good_value: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(7) ^ 0xA5).collect();
    create_raw_keys(
        &token,
        &[
            RawKey::good("good-master", good_value.clone()),
            RawKey::good("dup-master", vec![0x11; 32]),
            RawKey::good("dup-master", vec![0x22; 32]),
            RawKey {
                extractable: true,
                ..RawKey::good("extractable-master", vec![0x33; 32])
            },
            RawKey {
                sensitive: false,
                ..RawKey::good("nonsensitive-master", vec![0x44; 32])
            },
            RawKey {
                sign: false,
                ..RawKey::good("nosign-master", vec![0x55; 32])
            },
            RawKey {
                derive: true,
                ..RawKey::good("derive-master", vec![0x66; 32])
            },
        ],
    );

    // Control: a key made the same way with the right flags is accepted, KCV and all.
    let cfg = config(&token, "good.toml", &sp800_template("good-master"));
    let out = assert_check_ok(&token, &cfg);
    assert!(out.contains("\"good-master\""), "{out}");
    assert!(out.contains(&soft_kcv(&good_value, false)), "{out}");

    let cases: [(&str, &[&str]); 5] = [
        ("dup-master", &["dup-master", "2 objects"]),
        ("extractable-master", &["extractable-master", "extractable"]),
        (
            "nonsensitive-master",
            &["nonsensitive-master", "not sensitive"],
        ),
        ("nosign-master", &["nosign-master", "CKA_SIGN"]),
        ("derive-master", &["derive-master", "CKA_DERIVE"]),
    ];
    for (label, needles) in cases {
        let cfg = config(&token, &format!("{label}.toml"), &sp800_template(label));
        assert_both_refuse(&token, &cfg, needles);
    }
    // No KCV of a refused key is computed and shown by check.
    let (_, out, _) = run_divkey(
        &token,
        &[
            "check",
            "--config",
            p(&token.path().join("nosign-master.toml")),
        ],
    );
    assert!(out.is_empty(), "{out}");
}

#[test]
fn unknown_config_keys_are_refused() {
    let token = TestToken::new();
    let base = config_text(&token, "127.0.0.1:0", &sp800_template("admin-master"));
    let good = write_config(&token, "good.toml", &base);
    generate_ok(&token, &good, "admin-master", "aes128");
    assert_check_ok(&token, &good);

    let top = format!("bogus_top_level = 1\n{base}");
    let hsm = base.replacen("[hsm]\n", "[hsm]\nbogus_hsm_key = \"x\"\n", 1);
    let tpl = base.replacen(
        "[[profile_template]]\n",
        "[[profile_template]]\nbogus_template_key = true\n",
        1,
    );
    for (name, text, key) in [
        ("top.toml", top, "bogus_top_level"),
        ("hsm.toml", hsm, "bogus_hsm_key"),
        ("tpl.toml", tpl, "bogus_template_key"),
    ] {
        assert!(text.contains(key), "{name}");
        let cfg = write_config(&token, name, &text);
        assert_both_refuse(&token, &cfg, &[key]);
    }
}

#[test]
fn pin_file_readable_by_group_or_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let token = TestToken::new();
    let cfg = config(&token, "divkey.toml", "");
    assert_check_ok(&token, &cfg);
    for mode in [0o644, 0o640, 0o604] {
        std::fs::set_permissions(&token.pin_file, std::fs::Permissions::from_mode(mode)).unwrap();
        let shown = format!("{mode:o}");
        let needles = ["PIN", "user.pin", shown.as_str()];
        assert_check_refuses(&token, &cfg, &needles, &[USER_PIN]);
        if mode == 0o644 {
            assert_serve_refuses(&token, &cfg, &needles, &[USER_PIN]);
        }
    }
    std::fs::set_permissions(&token.pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_check_ok(&token, &cfg);
}

#[test]
fn an10922_aes128_template_with_aes256_master_is_refused() {
    let token = TestToken::new();
    let setup = config(&token, "setup.toml", "");
    generate_ok(&token, &setup, "master-256", "aes256");
    let kcv128 = generate_ok(&token, &setup, "master-128", "aes128");

    let cfg = config(
        &token,
        "mismatch.toml",
        &an10922_aes128_template("master-256"),
    );
    assert_both_refuse(&token, &cfg, &["master-256", "an10922-aes128", "aes256"]);

    // The same template with an AES-128 master key is fine.
    let cfg = config(&token, "match.toml", &an10922_aes128_template("master-128"));
    let out = assert_check_ok(&token, &cfg);
    assert!(out.contains(&kcv128), "{out}");
}

// ---------------------------------------------------------------------------------------
// B. Key tools

#[test]
fn keys_generate_list_and_check() {
    let token = TestToken::new();
    let setup = config(&token, "setup.toml", "");
    let mut kcvs = Vec::new();
    for (key_type, bits) in [("aes128", 128), ("aes192", 192), ("aes256", 256)] {
        let label = format!("gen-{key_type}");
        let kcv = generate_ok(&token, &setup, &label, key_type);
        kcvs.push((label, bits, kcv));
    }

    // The same label twice is refused, whatever the type, and by import too.
    for key_type in ["aes256", "aes128"] {
        let (code, out, err) = generate(&token, &setup, "gen-aes256", key_type);
        assert_ne!(code, 0, "duplicate generate:\n{out}{err}");
        assert_one_error_line(
            "duplicate generate",
            &err,
            &["gen-aes256", "already exists"],
        );
    }
    // Two valid components (a ceremony takes 2 to 5): refused for the label alone.
    let components = vec![
        "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4".to_owned(),
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f".to_owned(),
    ];
    let (code, out, err) = run_divkey(
        &token,
        &import_args(&setup, "gen-aes256", "aes256", &components, None),
    );
    assert_ne!(code, 0, "import over a generated key:\n{out}{err}");
    assert_one_error_line("import over a generated key", &err, &["gen-aes256"]);

    let rows = list_keys(&token, &setup);
    assert_eq!(rows.len(), 3, "{rows:?}");
    for (label, bits, kcv) in &kcvs {
        assert_listed_master(&token, &setup, label, *bits, kcv);
    }

    // check names each template's master key with its KCV.
    let rest = format!(
        "{}\n{}",
        sp800_template("gen-aes256"),
        an10922_aes128_template("gen-aes128")
    );
    let cfg = config(&token, "divkey.toml", &rest);
    let out = assert_check_ok(&token, &cfg);
    for (label, _, kcv) in kcvs.iter().filter(|(l, _, _)| l != "gen-aes192") {
        let line = out
            .lines()
            .find(|l| l.starts_with("master key") && l.contains(&format!("{label:?}")))
            .unwrap_or_else(|| panic!("check does not name {label}:\n{out}"));
        assert!(line.contains(kcv.as_str()), "{line}");
    }
    assert!(out.contains("ok: 2 template(s), 2 master key(s)"), "{out}");
    assert!(!out.contains("gen-aes192"), "{out}");
}

#[test]
fn keys_import_combines_components_by_xor() {
    let token = TestToken::new();
    let setup = config(&token, "setup.toml", "");

    // Two AES-128 components with the expected KCV given.
    let parts: Vec<Vec<u8>> = (0..2)
        .map(|_| rand::random::<[u8; 16]>().to_vec())
        .collect();
    let combined = xor_all(&parts);
    let kcv = soft_kcv(&combined, false);
    let hexes = vec![hex::encode(&parts[0]), hex::encode_upper(&parts[1])];
    let (code, out, err) = run_divkey(
        &token,
        &import_args(
            &setup,
            "imp-128",
            "aes128",
            &hexes,
            Some(&kcv.to_lowercase()),
        ),
    );
    assert_eq!(code, 0, "import:\n{out}{err}");
    let secrets = key_secrets(&parts);
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert_no_secret("import", &format!("{out}{err}"), &secrets);
    for (i, c) in parts.iter().enumerate() {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("component {} ", i + 1)))
            .unwrap_or_else(|| panic!("no KCV of component {}:\n{out}", i + 1));
        assert_eq!(
            field(line, "kcv=").as_deref(),
            Some(soft_kcv(c, false).as_str())
        );
    }
    let line = out
        .lines()
        .find(|l| l.starts_with("combined "))
        .expect(&out);
    assert_eq!(field(line, "kcv="), Some(kcv.clone()), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("imported "))
        .expect(&out);
    assert!(line.contains("label=imp-128"), "{line}");
    assert!(line.contains("type=aes128"), "{line}");
    assert_eq!(field(line, "kcv="), Some(kcv.clone()), "{line}");
    assert_listed_master(&token, &setup, "imp-128", 128, &kcv);

    // Three AES-256 components, no --kcv.
    let parts256: Vec<Vec<u8>> = (0..3)
        .map(|_| rand::random::<[u8; 32]>().to_vec())
        .collect();
    let kcv256 = soft_kcv(&xor_all(&parts256), false);
    let hexes: Vec<String> = parts256.iter().map(hex::encode).collect();
    let (code, out, err) = run_divkey(
        &token,
        &import_args(&setup, "imp-256", "aes256", &hexes, None),
    );
    assert_eq!(code, 0, "import:\n{out}{err}");
    let secrets256 = key_secrets(&parts256);
    let secrets256: Vec<&str> = secrets256.iter().map(String::as_str).collect();
    assert_no_secret("import 256", &format!("{out}{err}"), &secrets256);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("component ")).count(),
        3
    );
    let line = out
        .lines()
        .find(|l| l.starts_with("combined "))
        .expect(&out);
    assert_eq!(field(line, "kcv="), Some(kcv256.clone()), "{out}");
    assert_listed_master(&token, &setup, "imp-256", 256, &kcv256);

    // check uses the imported key and shows its software-computed KCV.
    let cfg = config(&token, "divkey.toml", &sp800_template("imp-256"));
    let out = assert_check_ok(&token, &cfg);
    assert!(out.contains(&kcv256), "{out}");
    assert_no_secret("check", &out, &secrets256);
}

#[test]
fn keys_import_refusals_store_nothing() {
    let token = TestToken::new();
    let setup = config(&token, "setup.toml", "");
    let parts: Vec<Vec<u8>> = (0..2)
        .map(|_| rand::random::<[u8; 16]>().to_vec())
        .collect();
    let good_hex: Vec<String> = parts.iter().map(hex::encode).collect();
    let kcv = soft_kcv(&xor_all(&parts), false);
    let wrong_kcv = other_kcv(&kcv);
    let short = rand::random::<[u8; 15]>().to_vec();
    let long = rand::random::<[u8; 24]>().to_vec();
    let same = rand::random::<[u8; 16]>().to_vec();

    struct Case {
        label: &'static str,
        key_type: &'static str,
        parts: Vec<Vec<u8>>,
        hexes: Vec<String>,
        kcv: Option<String>,
        needles: Vec<String>,
    }
    let cases = vec![
        Case {
            label: "bad-kcv",
            key_type: "aes128",
            parts: parts.clone(),
            hexes: good_hex.clone(),
            kcv: Some(wrong_kcv.clone()),
            needles: vec!["does not match".into(), wrong_kcv.clone()],
        },
        Case {
            label: "bad-kcv-format",
            key_type: "aes128",
            parts: parts.clone(),
            hexes: good_hex.clone(),
            kcv: Some("12345".into()),
            needles: vec!["--kcv".into()],
        },
        Case {
            label: "short-part",
            key_type: "aes128",
            parts: vec![parts[0].clone(), short.clone()],
            hexes: vec![good_hex[0].clone(), hex::encode(&short)],
            kcv: None,
            needles: vec!["component 2".into(), "15 bytes".into()],
        },
        Case {
            label: "long-part",
            key_type: "aes128",
            parts: vec![long.clone(), parts[1].clone()],
            hexes: vec![hex::encode(&long), good_hex[1].clone()],
            kcv: None,
            needles: vec!["component 1".into(), "24 bytes".into()],
        },
        Case {
            label: "wrong-type",
            key_type: "aes256",
            parts: parts.clone(),
            hexes: good_hex.clone(),
            kcv: None,
            needles: vec!["16 bytes".into(), "aes256".into()],
        },
        Case {
            label: "all-zero",
            key_type: "aes128",
            parts: vec![same.clone(), same.clone()],
            hexes: vec![hex::encode(&same), hex::encode_upper(&same)],
            kcv: None,
            needles: vec!["all zero".into()],
        },
        Case {
            label: "not-hex",
            key_type: "aes128",
            parts: vec![parts[0].clone()],
            hexes: vec![good_hex[0].clone(), format!("zz{}", &good_hex[1][2..])],
            kcv: None,
            needles: vec!["component 2".into(), "not hex".into()],
        },
    ];
    for c in &cases {
        let (code, out, err) = run_divkey(
            &token,
            &import_args(&setup, c.label, c.key_type, &c.hexes, c.kcv.as_deref()),
        );
        let what = format!("import {}", c.label);
        assert_ne!(code, 0, "{what} succeeded:\n{out}{err}");
        let needles: Vec<&str> = c.needles.iter().map(String::as_str).collect();
        assert_one_error_line(&what, &err, &needles);
        assert!(!out.contains("imported"), "{what}:\n{out}");
        let mut secrets = key_secrets(&c.parts);
        secrets.extend(c.hexes.iter().cloned());
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        assert_no_secret(&what, &format!("{out}{err}"), &secrets);
    }
    let rows = list_keys(&token, &setup);
    assert!(rows.is_empty(), "a refused import stored a key: {rows:?}");

    // The same components with the right KCV are then accepted.
    let (code, out, err) = run_divkey(
        &token,
        &import_args(&setup, "bad-kcv", "aes128", &good_hex, Some(&kcv)),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_listed_master(&token, &setup, "bad-kcv", 128, &kcv);
}

// ---------------------------------------------------------------------------------------
// C. token-hash

fn token_hash(stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(divkey_bin())
        .arg("token-hash")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn token_hash_prints_sha256_of_stdin() {
    let bearer = "s3cr3t-bearer-token-Zq81";
    for input in [
        format!("{bearer}\n"),
        format!("{bearer}\r\n"),
        bearer.to_owned(),
    ] {
        let (code, out, err) = token_hash(&input);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(out.trim(), sha256_hex(bearer), "input {input:?}");
        assert!(!out.contains(bearer) && !err.contains(bearer));
    }
    let (code, out, err) = token_hash("");
    assert_ne!(code, 0, "{out}{err}");
    assert_one_error_line("token-hash (empty)", &err, &["no token"]);
}
