// A fast fake LM Studio for the benchmark (Node: so the upstream costs the gateway's core nothing).
//
//   node bench/upstream.js PORT
//
// POST /v1/chat/completions answers at once; with "stream": true it sends max_tokens chunks, bench_delay_ms
// apart (an unknown field the gateway passes through), then a usage chunk and [DONE]. GET /v1/models lists one
// model. POST /v1/traces accepts OTLP/HTTP spans and drops them, so the gateway exports for real.
"use strict";
const http = require("http");

const port = Number(process.argv[2] || 18080);
const MODEL = "bench-model";
const MODELS = JSON.stringify({ object: "list", data: [{ id: MODEL, object: "model", owned_by: "bench" }] });

function completion(id) {
  return JSON.stringify({
    id, object: "chat.completion", created: 1700000000, model: MODEL,
    choices: [{ index: 0, finish_reason: "stop", message: { role: "assistant", content: "Hello from the bench." } }],
    usage: { prompt_tokens: 5, completion_tokens: 5, total_tokens: 10 },
  });
}

let counter = 0;

function stream(res, tokens, delay) {
  const id = "chatcmpl-bench-" + (++counter);
  const head = `{"id":"${id}","object":"chat.completion.chunk","created":1700000000,"model":"${MODEL}","choices":`;
  res.writeHead(200, { "Content-Type": "text/event-stream", "Cache-Control": "no-cache" });
  res.write(`data: ${head}[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n`);
  let sent = 0;
  const tail = () => {
    res.write(`data: ${head}[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n`);
    res.write(`data: ${head}[],"usage":{"prompt_tokens":5,"completion_tokens":${tokens},"total_tokens":${tokens + 5}}}\n\n`);
    res.end("data: [DONE]\n\n");
  };
  const next = () => {
    if (res.destroyed) return;
    if (delay === 0) {
      let batch = "";
      for (; sent < tokens; sent++) batch += `data: ${head}[{"index":0,"delta":{"content":" tok"},"finish_reason":null}]}\n\n`;
      res.write(batch);
      return tail();
    }
    res.write(`data: ${head}[{"index":0,"delta":{"content":" tok"},"finish_reason":null}]}\n\n`);
    if (++sent >= tokens) return tail();
    setTimeout(next, delay);
  };
  if (delay === 0) next(); else setTimeout(next, delay);
}

http.createServer((req, res) => {
  if (req.method === "GET" && req.url.startsWith("/v1/models")) {
    res.writeHead(200, { "Content-Type": "application/json" });
    return res.end(MODELS);
  }
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    if (req.url === "/v1/traces" || req.url === "/v1/metrics") {  // OTLP/HTTP sink
      res.writeHead(200, { "Content-Type": "application/x-protobuf" });
      return res.end();
    }
    if (req.method !== "POST" || req.url !== "/v1/chat/completions") {
      res.writeHead(404, { "Content-Type": "application/json" });
      return res.end('{"error":"not found"}');
    }
    let body;
    try { body = JSON.parse(Buffer.concat(chunks).toString()); } catch (e) {
      res.writeHead(400, { "Content-Type": "application/json" });
      return res.end('{"error":"bad json"}');
    }
    if (body.stream) return stream(res, body.max_tokens || 64, body.bench_delay_ms || 0);
    const text = completion("chatcmpl-bench-" + (++counter));
    res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(text) });
    res.end(text);
  });
}).listen(port, "127.0.0.1", () => console.log(`bench upstream on ${port}`));
