// Drives the /converse page in headless Chromium with a WAV file as the microphone.
// Usage: node converse_page.mjs URL WAV CHROMIUM [TIMEOUT_MS] [converse|vanish] [KEY,KEY,...]
// converse: waits for the first finished turn. vanish: closes the browser as soon as reply audio arrives
// (a user closing the tab mid-reply). KEYS: typed in turn each time the page asks for an API key; with them,
// after the turn the page is stopped and started again (it must not ask again).
// Prints one JSON line: {turns, audioBytes, errors, keyPrompts, user: [...], reply: [...], status, urls}
// (urls: every URL the page requested, WebSockets included).
import { createRequire } from "node:module";
const require = createRequire(process.env.PLAYWRIGHT_CORE_DIR + "/");
const { chromium } = require("playwright-core");

const [url, wav, executablePath, timeout = "300000", mode = "converse", keyList = ""] = process.argv.slice(2);
const keys = keyList.split(",").filter(Boolean);
const browser = await chromium.launch({
  executablePath,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
         "--use-fake-device-for-media-stream", `--use-file-for-fake-audio-capture=${wav}%noloop`,
         "--autoplay-policy=no-user-gesture-required"],
});
try {
  const page = await browser.newPage();
  page.on("console", (m) => console.error("page:", m.text()));
  const urls = [];
  page.on("request", (r) => urls.push(r.url()));
  page.on("websocket", (ws) => urls.push(ws.url()));
  (async () => {  // answers the page's key prompts with KEYS, in turn
    for (const key of keys) {
      await page.waitForSelector("#keyform:not([hidden])", { timeout: Number(timeout) });
      await page.fill("#key", key);
      await page.click("#usekey");
    }
  })().catch(() => {});
  await page.goto(url);
  await page.click("#start");
  await page.waitForFunction((mode) => {
    const d = document.getElementById("stats").dataset;
    return Number(mode === "vanish" ? d.audioBytes : d.turns) >= 1 || Number(d.errors) >= 1;
  }, mode, { timeout: Number(timeout) });
  if (keys.length && mode === "converse") {  // stopped and started again: the key is remembered
    await page.click("#stop");
    await page.click("#start");
    await page.waitForFunction(() => /Listening/.test(document.getElementById("status").textContent)
      || Number(document.getElementById("stats").dataset.errors) >= 1, null, { timeout: Number(timeout) });
  }
  const out = await page.evaluate(() => ({
    turns: Number(document.getElementById("stats").dataset.turns),
    audioBytes: Number(document.getElementById("stats").dataset.audioBytes),
    errors: Number(document.getElementById("stats").dataset.errors),
    keyPrompts: Number(document.getElementById("stats").dataset.keyPrompts),
    user: [...document.querySelectorAll("#log .user")].map((p) => p.textContent),
    reply: [...document.querySelectorAll("#log .reply")].map((p) => p.textContent),
    status: document.getElementById("status").textContent,
  }));
  out.urls = urls;
  console.log(JSON.stringify(out));
} finally {
  await browser.close();
}
