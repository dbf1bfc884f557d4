//! The studio's page in real headless Chromium, driven through chromedriver (WebDriver): draw a toy scene, invert
//! it, edit red to green, see the card, click a word and see its map. `.ci/run` installs Debian's `chromium` and
//! `chromium-driver` and sets STYLEDIFF_BROWSER_TEST=1; elsewhere the test says it skipped. With
//! STYLEDIFF_SCREENSHOT=PATH it saves the finished page there (the README's docs/studio.png).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{ClientBuilder, Locator};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn find(names: &[&str]) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    names
        .iter()
        .flat_map(|n| std::env::split_paths(&path).map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

async fn wait_for<F, Fut>(what: &str, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !ready().await {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_inverts_edits_and_shows_a_words_map() {
    let required = std::env::var_os("STYLEDIFF_BROWSER_TEST").is_some();
    let (Some(chromium), Some(driver)) = (
        find(&["chromium", "chromium-browser", "google-chrome"]),
        find(&["chromedriver"]),
    ) else {
        assert!(
            !required,
            "STYLEDIFF_BROWSER_TEST is set but chromium or chromedriver is missing"
        );
        eprintln!("SKIPPED: chromium and chromedriver are not installed (.ci/run installs them)");
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_stylediff"))
        .args(["serve", "--port", "0", "--data-dir"])
        .arg(data.path())
        .env_remove("STYLEDIFF_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _server = Killed(server);
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_string();

    let port = free_port();
    let _driver = Killed(
        Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,1250"],
        }),
    );
    let start = Instant::now();
    let client = loop {
        match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(c) => break c,
            Err(e) if start.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("chromedriver: {e}"),
        }
    };
    client.goto(&url).await.unwrap();
    wait_for("the page to load its model", || async {
        client
            .find(Locator::Id("model"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .contains("model")
    })
    .await;

    // A toy scene drawn from its caption, inverted quickly.
    client
        .find(Locator::Id("draw"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for("the scene", || async {
        client
            .find(Locator::Id("preview"))
            .await
            .unwrap()
            .attr("hidden")
            .await
            .unwrap()
            .is_none()
    })
    .await;
    for (id, value) in [("steps", "20"), ("inner", "10")] {
        let field = client.find(Locator::Id(id)).await.unwrap();
        field.clear().await.unwrap();
        field.send_keys(value).await.unwrap();
    }
    client
        .find(Locator::Id("invert"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for("the inversion", || async {
        client
            .find(Locator::Id("status"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .starts_with("done")
    })
    .await;
    let listed = client
        .find(Locator::Css("#inversions div"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        listed.contains("a red circle on a blue background"),
        "{listed}"
    );

    // Red to green: a card appears with the target prompt and an image that loaded.
    let target = client.find(Locator::Id("target")).await.unwrap();
    target.clear().await.unwrap();
    target
        .send_keys("a green circle on a blue background")
        .await
        .unwrap();
    client
        .find(Locator::Id("edit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for("the edit's card", || async {
        client
            .find_all(Locator::Css("#gallery .card"))
            .await
            .unwrap()
            .len()
            == 1
    })
    .await;
    let card = client
        .find(Locator::Css("#gallery .card"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        card.contains("a green circle on a blue background"),
        "{card}"
    );
    wait_for("the card's image", || async {
        client
            .execute(
                "return document.querySelector('#gallery .card img').naturalWidth",
                vec![],
            )
            .await
            .unwrap()
            .as_u64()
            == Some(32)
    })
    .await;

    // Click a word: its map is drawn over the reconstruction.
    let words = client.find_all(Locator::Css("#words span")).await.unwrap();
    assert_eq!(words.len(), 7);
    words[1].click().await.unwrap();
    wait_for("the word's map", || async {
        client
            .find(Locator::Id("map-caption"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            == "where \"red\" attends"
    })
    .await;
    let painted = client
        .execute(
            "const d = document.getElementById('map').getContext('2d').getImageData(0, 0, 192, 192).data; \
             let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;",
            vec![],
        )
        .await
        .unwrap()
        .as_u64()
        .unwrap();
    assert_eq!(painted, 192 * 192, "the whole map is painted");

    if let Some(path) = std::env::var_os("STYLEDIFF_SCREENSHOT") {
        let png = client.screenshot().await.unwrap();
        std::fs::write(&path, png).unwrap();
        eprintln!("wrote {}", std::path::Path::new(&path).display());
    }
    client.close().await.unwrap();
}
