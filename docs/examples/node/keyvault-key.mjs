// Read a TA API key from keyvault with Node's standard library only (Node 18+: fetch).
//
// - The token is read from a file (never from argv or a literal in the code); the file is read
//   again on each request, so a replaced token file is picked up without a restart.
// - The key is cached with its ETag and revalidated with If-None-Match: an unchanged key costs
//   a 304 with no body; a rotated one comes back at once (keyvault answers from the database).
// - Redirects are refused (a redirect could carry the bearer token to another host).
//
//   import { KeyvaultKey } from "./keyvault-key.mjs";
//   const kv = new KeyvaultKey({ addr: "http://127.0.0.1:8200", tokenFile: "/etc/billing/keyvault.token",
//                                cluster: "prod", appid: "MYAPP" });
//   const { key, version } = await kv.get();  // call it before each use: a 304 costs little
//
// Run as a script it prints what it read, never the key:
//   KEYVAULT_TOKEN_FILE=/etc/billing/keyvault.token node keyvault-key.mjs http://127.0.0.1:8200 prod MYAPP
// (no APPID: the root key). One JSON line per read, two reads: {"status":200,...} then 304.

import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

export class KeyvaultKey {
  constructor({ addr, tokenFile, cluster, appid = null, timeoutMs = 10000 }) {
    const scope = appid === null ? "root" : `apps/${encodeURIComponent(appid)}`;
    this.url = `${addr.replace(/\/+$/, "")}/v1/clusters/${encodeURIComponent(cluster)}/${scope}`;
    this.tokenFile = tokenFile;
    this.timeoutMs = timeoutMs;
    this.etag = null;
    this.current = null; // {cluster, scope, version, fingerprint, created_at, key}
    this.lastStatus = null;
  }

  async get() {
    const token = readFileSync(this.tokenFile, "utf8").trim();
    const headers = { Authorization: `Bearer ${token}` };
    if (this.etag !== null) headers["If-None-Match"] = this.etag;
    const response = await fetch(this.url, {
      headers,
      redirect: "error",
      signal: AbortSignal.timeout(this.timeoutMs),
    });
    this.lastStatus = response.status;
    if (response.status === 304 && this.current !== null) return this.current;
    if (response.status !== 200) {
      // Every keyvault error is JSON {error, detail, request_id}: never a key.
      const error = await response.json().catch(() => ({}));
      throw new Error(`keyvault answered ${response.status} ${error.error ?? ""}: ${error.detail ?? ""}`);
    }
    this.current = await response.json();
    this.etag = response.headers.get("etag");
    return this.current;
  }
}

async function main([addr, cluster, appid]) {
  const tokenFile = process.env.KEYVAULT_TOKEN_FILE;
  if (!addr || !cluster || !tokenFile) {
    console.error("usage: KEYVAULT_TOKEN_FILE=FILE node keyvault-key.mjs ADDR CLUSTER [APPID]");
    process.exit(2);
  }
  const kv = new KeyvaultKey({ addr, tokenFile, cluster, appid: appid ?? null });
  for (let i = 0; i < 2; i++) {
    const { version, fingerprint } = await kv.get();
    console.log(JSON.stringify({ status: kv.lastStatus, version, fingerprint, etag: kv.etag }));
  }
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  main(process.argv.slice(2)).catch((error) => {
    console.error(`error: ${error.message}`);
    process.exit(1);
  });
}
