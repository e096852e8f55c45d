// Command keyvaultkey reads a TA API key from keyvault with Go's standard library only.
//
//   - The token is read from a file (never from argv or a literal in the code), again on each
//     request, so a replaced token file is picked up without a restart.
//   - The key is cached with its ETag and revalidated with If-None-Match: an unchanged key
//     costs a 304 with no body; a rotated one comes back at once.
//   - Redirects are refused (a redirect could carry the bearer token to another host).
//
// Run as a program it prints what it read, never the key (two reads: 200, then 304):
//
//	KEYVAULT_TOKEN_FILE=/etc/billing/keyvault.token go run . http://127.0.0.1:8200 prod MYAPP
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"
)

// Key is the JSON body of GET /v1/clusters/{cluster}/root|apps/{appid}.
type Key struct {
	Cluster     string `json:"cluster"`
	Scope       string `json:"scope"`
	Version     int    `json:"version"`
	Fingerprint string `json:"fingerprint"`
	CreatedAt   string `json:"created_at"`
	Key         string `json:"key"`
}

// KeyvaultKey caches one key and revalidates it by ETag on every Get.
type KeyvaultKey struct {
	URL        string
	TokenFile  string
	Client     *http.Client
	etag       string
	current    *Key
	LastStatus int
}

// New returns a reader of the key of appid ("" for the root key) in cluster.
func New(addr, tokenFile, cluster, appid string) *KeyvaultKey {
	scope := "root"
	if appid != "" {
		scope = "apps/" + url.PathEscape(appid)
	}
	return &KeyvaultKey{
		URL:       strings.TrimRight(addr, "/") + "/v1/clusters/" + url.PathEscape(cluster) + "/" + scope,
		TokenFile: tokenFile,
		Client: &http.Client{
			Timeout: 10 * time.Second,
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return errors.New("keyvault redirected: refused")
			},
		},
	}
}

// Get returns the current key: the cached one if keyvault answers 304.
func (k *KeyvaultKey) Get() (*Key, error) {
	token, err := os.ReadFile(k.TokenFile)
	if err != nil {
		return nil, fmt.Errorf("reading the token file: %w", err)
	}
	req, err := http.NewRequest(http.MethodGet, k.URL, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	if k.etag != "" {
		req.Header.Set("If-None-Match", k.etag)
	}
	resp, err := k.Client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	k.LastStatus = resp.StatusCode
	if resp.StatusCode == http.StatusNotModified && k.current != nil {
		return k.current, nil
	}
	if resp.StatusCode != http.StatusOK {
		// Every keyvault error is JSON {error, detail, request_id}: never a key.
		var body struct{ Error, Detail string }
		_ = json.NewDecoder(resp.Body).Decode(&body)
		return nil, fmt.Errorf("keyvault answered %d %s: %s", resp.StatusCode, body.Error, body.Detail)
	}
	var key Key
	if err := json.NewDecoder(resp.Body).Decode(&key); err != nil {
		return nil, err
	}
	k.current, k.etag = &key, resp.Header.Get("ETag")
	return k.current, nil
}

func main() {
	tokenFile := os.Getenv("KEYVAULT_TOKEN_FILE")
	if len(os.Args) < 3 || tokenFile == "" {
		fmt.Fprintln(os.Stderr, "usage: KEYVAULT_TOKEN_FILE=FILE keyvaultkey ADDR CLUSTER [APPID]")
		os.Exit(2)
	}
	appid := ""
	if len(os.Args) > 3 {
		appid = os.Args[3]
	}
	kv := New(os.Args[1], tokenFile, os.Args[2], appid)
	for i := 0; i < 2; i++ {
		key, err := kv.Get()
		if err != nil {
			fmt.Fprintln(os.Stderr, "error:", err)
			os.Exit(1)
		}
		line, _ := json.Marshal(map[string]any{
			"status": kv.LastStatus, "version": key.Version, "fingerprint": key.Fingerprint, "etag": kv.etag,
		})
		fmt.Println(string(line))
	}
}
