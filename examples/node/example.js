#!/usr/bin/env node
// Example Node.js client for provider-gateway.
//
// Usage: node example.js [--target 127.0.0.1:50051] [--provider NAME] [prompt words...]
//
// Loads ../../proto/provider_gateway/v1/provider_gateway.proto at run time
// (no generated code), lists the providers, asks for one whole answer
// (Complete) and then for a streamed one (Stream). Against the built-in
// `mock` provider, which echoes the last user message word by word, it also
// checks the answers and prints "node example: OK". Any failure ends the
// program with a one-line error on stderr and a non-zero status.

"use strict";

const path = require("node:path");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = path.join(__dirname, "..", "..", "proto", "provider_gateway", "v1", "provider_gateway.proto");
const DEFAULT_PROMPT = "hello from node";
const TIMEOUT_MS = 10_000;

class CheckFailed extends Error {}

function check(condition, message) {
  if (!condition) throw new CheckFailed(message);
}

function loadService() {
  const definition = protoLoader.loadSync(PROTO, {
    keepCase: true, // field names as the proto spells them: stop_reason, not stopReason
    enums: String, // enum values by name: "STOP_REASON_END_TURN"
    longs: String,
    defaults: true, // unset scalars read as their zero value
    oneofs: true, // a oneof's name holds the name of the field that is set
  });
  return grpc.loadPackageDefinition(definition).provider_gateway.v1.ProviderGateway;
}

function deadline() {
  return new Date(Date.now() + TIMEOUT_MS);
}

function messagesFor(prompt) {
  return [{ role: "ROLE_USER", content: [{ text: prompt }] }];
}

function first(metadata, key) {
  const values = metadata ? metadata.get(key) : [];
  return values.length > 0 ? String(values[0]) : "-";
}

function listProviders(client) {
  return new Promise((resolve, reject) => {
    client.ListProviders({}, { deadline: deadline() }, (err, resp) => {
      if (err) return reject(err);
      console.log(`providers (default: ${resp.default_provider || "-"}):`);
      for (const p of resp.providers) {
        console.log(`  ${p.name}  kind=${p.kind}  default_model=${p.default_model || "-"}`);
      }
      resolve(resp);
    });
  });
}

function complete(client, provider, prompt) {
  return new Promise((resolve, reject) => {
    const metadata = new grpc.Metadata();
    metadata.set("x-retry-max-attempts", "2");
    let headers = null;
    const call = client.Complete(
      { provider, messages: messagesFor(prompt) },
      metadata,
      { deadline: deadline() },
      (err, resp) => {
        if (err) return reject(err);
        const text = resp.content
          .filter((b) => b.block === "text")
          .map((b) => b.text)
          .join("");
        console.log("complete:");
        console.log(`  provider=${resp.provider} model=${resp.model} id=${resp.id}`);
        console.log(`  text: ${JSON.stringify(text)}`);
        console.log(`  stop_reason: ${resp.stop_reason}`);
        const usage = resp.usage || { input_tokens: 0, output_tokens: 0 };
        console.log(`  usage: input_tokens=${usage.input_tokens} output_tokens=${usage.output_tokens}`);
        console.log(`  attempts: ${resp.attempts}`);
        console.log(`  x-gateway-attempts: ${first(headers, "x-gateway-attempts")}`);
        console.log(`  x-gateway-provider: ${first(headers, "x-gateway-provider")}`);
        resolve({ text, stopReason: resp.stop_reason });
      },
    );
    // Response headers arrive before the message.
    call.on("metadata", (m) => {
      headers = m;
    });
  });
}

function stream(client, provider, prompt) {
  return new Promise((resolve, reject) => {
    const call = client.Stream({ provider, messages: messagesFor(prompt) }, { deadline: deadline() });
    const pieces = [];
    const stops = [];
    let trailers = null;
    process.stdout.write("stream: ");
    call.on("data", (event) => {
      if (event.event === "delta" && event.delta.delta === "text") {
        pieces.push(event.delta.text);
        process.stdout.write(event.delta.text);
      } else if (event.event === "stop") {
        stops.push(event.stop.stop_reason);
      }
    });
    // A stream is done when both its end and its status (which carries the
    // trailers) have arrived, in whichever order grpc-js emits them.
    let ended = false;
    const finish = () => {
      if (!ended || trailers === null) return;
      process.stdout.write("\n");
      for (const reason of stops) console.log(`  stop_reason: ${reason}`);
      console.log(`  x-gateway-attempts (trailer): ${first(trailers, "x-gateway-attempts")}`);
      resolve({ streamed: pieces.join(""), stops });
    };
    call.on("status", (status) => {
      trailers = status.metadata;
      finish();
    });
    call.on("end", () => {
      ended = true;
      finish();
    });
    call.on("error", (err) => {
      process.stdout.write("\n");
      reject(err);
    });
  });
}

function parseCommandLine() {
  const { values, positionals } = parseArgs({
    options: {
      target: { type: "string", default: "127.0.0.1:50051" },
      provider: { type: "string", default: "" },
      help: { type: "boolean", short: "h", default: false },
    },
    allowPositionals: true,
  });
  if (values.help) {
    console.log("usage: node example.js [--target HOST:PORT] [--provider NAME] [prompt words...]");
    process.exit(0);
  }
  const prompt = positionals.length > 0 ? positionals.join(" ") : DEFAULT_PROMPT;
  return { target: values.target, provider: values.provider, prompt };
}

async function main() {
  let args;
  try {
    args = parseCommandLine();
  } catch (err) {
    console.error(`error: ${err.message}`);
    return 2;
  }
  const ProviderGateway = loadService();
  const client = new ProviderGateway(args.target, grpc.credentials.createInsecure());
  try {
    const providers = await listProviders(client);
    const chosen = args.provider || providers.default_provider;
    const kinds = new Map(providers.providers.map((p) => [p.name, p.kind]));
    const isMock = kinds.get(chosen) === "mock";

    const { text, stopReason } = await complete(client, args.provider, args.prompt);
    const { streamed, stops } = await stream(client, args.provider, args.prompt);

    if (isMock) {
      // The mock echoes the prompt's words joined by single spaces.
      const expected = args.prompt.split(/\s+/).filter(Boolean).join(" ");
      check(text === expected, `Complete text ${JSON.stringify(text)} != ${JSON.stringify(expected)}`);
      check(stopReason === "STOP_REASON_END_TURN", `Complete stop reason ${stopReason} != STOP_REASON_END_TURN`);
      check(streamed === expected, `streamed text ${JSON.stringify(streamed)} != ${JSON.stringify(expected)}`);
      check(stops.length === 1, `expected exactly one stop event, got ${stops.length}`);
    } else {
      console.log(`(provider ${JSON.stringify(chosen)} is not the mock; answers not checked)`);
    }
  } catch (err) {
    if (err instanceof CheckFailed) {
      console.error(`error: mock check failed: ${err.message}`);
    } else if (err.code !== undefined && grpc.status[err.code] !== undefined) {
      console.error(`error: ${grpc.status[err.code]}: ${err.details}`);
    } else {
      console.error(`error: ${err.message}`);
    }
    return 1;
  } finally {
    client.close();
  }
  console.log("node example: OK");
  return 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    console.error(`error: ${err && err.message ? err.message : err}`);
    process.exitCode = 1;
  },
);
