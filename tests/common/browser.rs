//! Real-browser tests of `db-ops studio`: a headless chromium driven through
//! chromedriver (WebDriver, with `fantoccini`), and the studio itself as a
//! child process on a test database. Each test starts its own of both, so
//! tests run in parallel; everything is killed when dropped.
//!
//! Programs: `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian's
//! `chromium` and `chromium-driver`, which `.ci/run` installs), or the
//! paths in `CHROME_BIN` and `CHROMEDRIVER`.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::error::CmdError;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use workflow_db::testing::TestDatabase;

/// How long a wait for the page (an element, a condition) may take.
pub const WAIT: Duration = Duration::from_secs(10);

const OPS: &str = env!("CARGO_BIN_EXE_db-ops");

/// A program of the browser setup: its path (from `env`, else `default`),
/// or a panic that says what is missing and how to install it.
fn program(env: &str, default: &str, package: &str) -> PathBuf {
    let path = std::env::var_os(env).map_or_else(|| PathBuf::from(default), PathBuf::from);
    assert!(
        is_executable(&path),
        "{} not found (the studio's browser tests need it): install it with \
         `apt-get install {package}` (.ci/run does), or set {env} to its path",
        path.display()
    );
    path
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A child process killed, with its whole process group, when dropped.
struct Group(Child);

impl Group {
    fn spawn(command: &mut Command) -> std::io::Result<Group> {
        use std::os::unix::process::CommandExt;
        command.process_group(0).spawn().map(Group)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // The group holds chromedriver and the chromium it started (or the studio).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A headless chromium session (through its own chromedriver).
pub struct Browser {
    client: Option<Client>,
    // Dropped after the session is closed: chromedriver, then the directory
    // of chromium's profile and temporary files.
    _driver: Group,
    _dir: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free port and opens a session of headless
    /// chromium (1400x1000).
    pub async fn start() -> Browser {
        let chrome = program("CHROME_BIN", "/usr/bin/chromium", "chromium");
        let chromedriver = program("CHROMEDRIVER", "/usr/bin/chromedriver", "chromium-driver");
        let dir = tempfile::tempdir().unwrap();
        let (profile, tmp) = (dir.path().join("profile"), dir.path().join("tmp"));
        std::fs::create_dir(&tmp).unwrap();
        let (driver, port) = start_chromedriver(&chromedriver, &tmp);
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chrome,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "no chromium session through {} (chromium {}): {e}",
                    chromedriver.display(),
                    chrome.display()
                )
            });
        Browser {
            client: Some(client),
            _driver: driver,
            _dir: dir,
        }
    }

    pub fn client(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    /// Opens `url` (waits for the page to load).
    pub async fn goto(&self, url: &str) {
        self.client()
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("cannot open {url}: {e}"));
    }

    /// Runs `script` (a function body: `return ...`) in the page.
    pub async fn js(&self, script: &str) -> Value {
        self.client()
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Waits (up to [`WAIT`]) for an element matching `css`.
    pub async fn wait_for(&self, css: &str) -> Element {
        match self
            .client()
            .wait()
            .at_most(WAIT)
            .every(Duration::from_millis(50))
            .for_element(Locator::Css(css))
            .await
        {
            Ok(e) => e,
            Err(e) => panic!("no `{css}` within {WAIT:?}: {e}\n{}", self.context().await),
        }
    }

    /// Clicks the element matching `css`, once there (found again when a
    /// live update replaced it between finding and clicking).
    pub async fn click(&self, css: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.wait_for(css).await.click().await {
                Ok(()) => return,
                Err(e) if e.is_stale_element_reference() && Instant::now() < deadline => {}
                Err(e) => panic!("cannot click `{css}`: {e}\n{}", self.context().await),
            }
        }
    }

    /// The visible text of the element matching `css`, once there (read in
    /// one script, so that a live update cannot stale it).
    pub async fn text_of(&self, css: &str) -> String {
        self.wait_for(css).await;
        let css = serde_json::to_string(css).unwrap();
        let text = self
            .js(&format!(
                "const e = document.querySelector({css}); return e ? e.innerText : null;"
            ))
            .await;
        text.as_str().unwrap_or_default().to_owned()
    }

    /// Waits (up to [`WAIT`]) until the JavaScript expression `condition`
    /// is true in the page (re-evaluated, across navigations, every 50 ms).
    pub async fn wait_until(&self, condition: &str) {
        let script = format!("return !!({condition});");
        let deadline = Instant::now() + WAIT;
        loop {
            match self.client().execute(&script, Vec::new()).await {
                Ok(Value::Bool(true)) => return,
                // A page being replaced may fail a script: try again.
                Ok(_) | Err(CmdError::Standard(_)) => {}
                Err(e) => panic!("waiting for `{condition}`: {e}"),
            }
            if Instant::now() > deadline {
                panic!(
                    "`{condition}` not true within {WAIT:?}\n{}",
                    self.context().await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the page at a URL with this path (and query, if given)
    /// has loaded.
    pub async fn wait_for_page(&self, path_and_query: &str) {
        let want = serde_json::to_string(path_and_query).unwrap();
        self.wait_until(&format!(
            "document.readyState === 'complete' && \
             (location.pathname + location.search === {want} || location.pathname === {want})"
        ))
        .await;
    }

    /// The elements matching `css` now (no wait).
    pub async fn all(&self, css: &str) -> Vec<Element> {
        self.client().find_all(Locator::Css(css)).await.unwrap()
    }

    /// The page's visible text.
    pub async fn text(&self) -> String {
        self.js("return document.body.innerText;")
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// What a failed wait reports: where the browser is and the page's start.
    async fn context(&self) -> String {
        let url = self
            .client()
            .current_url()
            .await
            .map_or_else(|e| e.to_string(), |u| u.to_string());
        let source = self.client().source().await.unwrap_or_default();
        let cut = source
            .char_indices()
            .nth(4000)
            .map_or(source.len(), |(i, _)| i);
        format!("page {url}:\n{}", &source[..cut])
    }

    /// A PNG of the window.
    pub async fn screenshot(&self) -> Vec<u8> {
        self.client().screenshot().await.unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // End the session (chromium quits and removes its lock files) when a
        // multi-thread runtime lets us wait for it; the process group is
        // killed anyway.
        let Some(client) = self.client.take() else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
                tokio::task::block_in_place(|| {
                    rt.block_on(async {
                        let _ = tokio::time::timeout(Duration::from_secs(5), client.close()).await;
                    })
                });
            }
        }
    }
}

/// chromedriver on a free port, once it accepts connections.
/// Its temporary files and chromium's go to `tmp`.
fn start_chromedriver(chromedriver: &Path, tmp: &Path) -> (Group, u16) {
    let mut last = String::new();
    for _ in 0..3 {
        let port = free_port();
        let mut driver = Group::spawn(
            Command::new(chromedriver)
                .arg(format!("--port={port}"))
                .env("TMPDIR", tmp)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit()),
        )
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (install it with `apt-get install chromium-driver`, \
                 or set CHROMEDRIVER)",
                chromedriver.display()
            )
        });
        let deadline = Instant::now() + WAIT;
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return (driver, port);
            }
            if let Some(status) = driver.0.try_wait().unwrap() {
                // Most likely the port was taken in between: another one.
                last = format!("chromedriver exited ({status}) on port {port}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver does not listen on port {port} after {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("{last}");
}

/// `db-ops studio` on a free port of 127.0.0.1, serving a test database.
pub struct Studio {
    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub base: String,
    /// The first line it printed.
    pub first_line: String,
    _child: Group,
}

impl Studio {
    /// `db-ops [global] studio --bind 127.0.0.1:0 [extra]` on `db`: global
    /// options (`--json`) before `studio`, its own (`--allow-actions`) after.
    pub fn start_with(db: &TestDatabase, global: &[&str], extra: &[&str]) -> Studio {
        Studio::serve(db.url().expose(), global, extra)
    }

    fn serve(database_url: &str, global: &[&str], extra: &[&str]) -> Studio {
        let mut child = Group::spawn(
            Command::new(OPS)
                .args(global)
                .args(["studio", "--bind", "127.0.0.1:0"])
                .args(extra)
                .current_dir(std::env::temp_dir())
                .env("DATABASE_URL", database_url)
                .env_remove("NO_COLOR")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        )
        .unwrap();
        let stdout = child.0.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // The first line goes to the test; the rest is read so that the
            // studio never blocks on a full pipe.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let first_line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(e) => {
                // Its stdout closed: give it a moment to exit, for the status.
                let deadline = Instant::now() + Duration::from_secs(2);
                let status = loop {
                    match child.0.try_wait() {
                        Ok(None) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        other => break other.ok().flatten(),
                    }
                };
                panic!(
                    "db-ops {global:?} studio {extra:?} printed no first line ({e}); exit status {status:?}"
                )
            }
        };
        let url = if global.contains(&"--json") {
            let v: Value = serde_json::from_str(&first_line)
                .unwrap_or_else(|e| panic!("first line is not JSON ({e}): {first_line}"));
            assert_eq!(v["event"], "listening", "{first_line}");
            v["url"].as_str().unwrap().to_owned()
        } else {
            // `studio listening on URL`, then maybe a remark (` (actions on)`).
            first_line
                .strip_prefix("studio listening on ")
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_else(|| panic!("unexpected first line: {first_line:?}"))
                .to_owned()
        };
        assert!(
            url.starts_with("http://127.0.0.1:") && url.ends_with('/'),
            "{first_line}"
        );
        Studio {
            base: url.trim_end_matches('/').to_owned(),
            first_line,
            _child: child,
        }
    }

    /// The URL of `path` (starting with `/`).
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A plain HTTP/1.1 request to the studio (no browser), with `form` as
    /// its url-encoded body (empty when `None`) unless a GET: status and body.
    pub async fn request(&self, method: &str, path: &str, form: Option<&str>) -> (u16, String) {
        let authority = self.base.strip_prefix("http://").unwrap();
        let mut stream = tokio::net::TcpStream::connect(authority).await.unwrap();
        let body = form.unwrap_or("");
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if method != "GET" {
            head.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
            .await
            .expect("the studio answers within 10 s")
            .unwrap();
        let response = String::from_utf8_lossy(&response).into_owned();
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
        let body = response
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        (status, body)
    }
}

/// The studio on `db` (with `extra` arguments) and a browser, started side
/// by side.
pub async fn open(db: &TestDatabase, extra: &[&str]) -> (Studio, Browser) {
    let url = db.url().expose().to_owned();
    let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
    let studio = tokio::task::spawn_blocking(move || {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        Studio::serve(&url, &[], &extra)
    });
    let browser = Browser::start().await;
    let studio = studio
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    (studio, browser)
}

/// Where artifacts of the browser tests go: `$CARGO_TARGET_DIR/studio`, else
/// `target/studio` of the crate (created).
pub fn artifact_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
        PathBuf::from,
    );
    let dir = target.join("studio");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
