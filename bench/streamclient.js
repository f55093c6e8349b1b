// Streaming load: CONCURRENCY clients, each opening streams back to back for SECONDS; prints one JSON line with
// requests, chunks, errors, TTFT (first content chunk) and total-time percentiles in milliseconds.
//
//   node bench/streamclient.js URL CONCURRENCY SECONDS TOKENS DELAY_MS [HOLD]
//
// HOLD=1: open CONCURRENCY streams once and wait for them all (for memory under many slow streams).
// Slow streams (DELAY_MS > 0) start staggered over one stream's length, so the clients are spread out as real
// ones are, instead of all asking at the same instant every time round.
"use strict";
const http = require("http");

const [url, concurrency, seconds, tokens, delay, hold] = process.argv.slice(2);
const target = new URL(url);
const body = JSON.stringify({
  model: "bench-model", stream: true, max_tokens: Number(tokens), bench_delay_ms: Number(delay),
  messages: [{ role: "user", content: "benchmark" }],
});
const agent = new http.Agent({ keepAlive: true, maxSockets: Number(concurrency) });
const ttft = [], total = [];
let requests = 0, chunks = 0, errors = 0;
const deadline = Date.now() + Number(seconds) * 1000;

function one() {
  return new Promise((resolve) => {
    const start = process.hrtime.bigint();
    let first = null, seen = 0, tail = "";
    const req = http.request({
      host: target.hostname, port: target.port, path: "/v1/chat/completions", method: "POST", agent,
      headers: { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) },
    }, (res) => {
      if (res.statusCode !== 200) { errors++; res.resume(); return res.on("end", resolve); }
      res.setEncoding("utf8");
      res.on("data", (d) => {
        const text = tail + d;
        const parts = text.split("\n\n");
        tail = parts.pop();
        for (const p of parts) {
          if (p.includes('"content":" tok"')) {
            seen++;
            if (first === null) first = process.hrtime.bigint();
          }
        }
      });
      res.on("end", () => {
        const end = process.hrtime.bigint();
        if (seen !== Number(tokens) || tail !== "") errors++;  // every token, and the stream ended cleanly
        else {
          requests++; chunks += seen;
          ttft.push(Number(first - start) / 1e6); total.push(Number(end - start) / 1e6);
        }
        resolve();
      });
    });
    req.on("error", () => { errors++; resolve(); });
    req.end(body);
  });
}

function pct(values, q) {
  if (!values.length) return null;
  const sorted = values.slice().sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

const stagger = Number(delay) * Number(tokens) / Number(concurrency);

async function worker(index) {
  if (stagger) await new Promise((resolve) => setTimeout(resolve, index * stagger));
  while (Date.now() < deadline) await one();
}

(async () => {
  const started = Date.now();
  if (hold === "1") await Promise.all(Array.from({ length: Number(concurrency) }, one));
  else await Promise.all(Array.from({ length: Number(concurrency) }, (_, i) => worker(i)));
  const elapsed = (Date.now() - started) / 1000;
  console.log(JSON.stringify({
    requests, chunks, errors, elapsed, rps: requests / elapsed, chunks_per_sec: chunks / elapsed,
    ttft_p50: pct(ttft, 0.5), ttft_p99: pct(ttft, 0.99), total_p50: pct(total, 0.5), total_p99: pct(total, 0.99),
  }));
  agent.destroy();
})();
