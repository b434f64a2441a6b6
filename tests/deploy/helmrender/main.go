// helmrender: renders a Helm chart's templates the way `helm template` does, for tests on machines
// without helm. Go's text/template + sprig (Debian: golang-go, golang-github-masterminds-sprig-dev),
// plus the functions and objects Helm adds: include, tpl, required, toYaml/fromYaml/toJson/fromJson,
// .Values (chart values coalesced with -f files, null deletes), .Release, .Chart, .Capabilities,
// .Template, .Files (Get, Glob, Lines, AsConfig, AsSecrets). Not implemented: lookup (returns an empty
// map, as in `helm template`), subcharts, hooks, .helmignore.
//
// Output (stdout, JSON): {"values": merged values, "manifests": [{"source", "content"}], "notes": "..."}.
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	semver "github.com/Masterminds/semver"
	"github.com/Masterminds/sprig"
	yaml2 "gopkg.in/yaml.v2"
)

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// chartMeta mirrors the fields of Helm's chart.Metadata that templates reach as .Chart.X.
type chartMeta struct {
	APIVersion  string              `yaml:"apiVersion" json:"apiVersion"`
	Name        string              `yaml:"name" json:"name"`
	Version     string              `yaml:"version" json:"version"`
	AppVersion  string              `yaml:"appVersion" json:"appVersion"`
	KubeVersion string              `yaml:"kubeVersion" json:"kubeVersion"`
	Description string              `yaml:"description" json:"description"`
	Type        string              `yaml:"type" json:"type"`
	Home        string              `yaml:"home" json:"home"`
	Icon        string              `yaml:"icon" json:"icon"`
	Sources     []string            `yaml:"sources" json:"sources"`
	Keywords    []string            `yaml:"keywords" json:"keywords"`
	Annotations map[string]string   `yaml:"annotations" json:"annotations"`
	Maintainers []map[string]string `yaml:"maintainers" json:"maintainers"`
	Deprecated  bool                `yaml:"deprecated" json:"deprecated"`
}

// files is .Files: every chart file outside templates/ and the chart's own metadata files.
type files map[string][]byte

func (f files) Get(name string) string      { return string(f[name]) }
func (f files) GetBytes(name string) []byte { return f[name] }

func (f files) Glob(pattern string) files {
	out := files{}
	for name, data := range f {
		if ok, _ := path.Match(pattern, name); ok {
			out[name] = data
		}
	}
	return out
}

func (f files) Lines(name string) []string {
	if f[name] == nil {
		return []string{}
	}
	return strings.Split(strings.TrimRight(string(f[name]), "\n"), "\n")
}

func (f files) AsConfig() string {
	m := map[string]string{}
	for name, data := range f {
		m[path.Base(name)] = string(data)
	}
	return toYAML(m)
}

func (f files) AsSecrets() string {
	m := map[string]string{}
	for name, data := range f {
		m[path.Base(name)] = base64.StdEncoding.EncodeToString(data)
	}
	return toYAML(m)
}

type apiVersions []string

func (a apiVersions) Has(v string) bool {
	for _, x := range a {
		if x == v {
			return true
		}
	}
	return false
}

// toYAML is Helm's: JSON first (so keys sort and numbers print as JSON does), then YAML.
func toYAML(v interface{}) string {
	j, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	var generic interface{}
	if err := yaml2.Unmarshal(j, &generic); err != nil {
		return ""
	}
	out, err := yaml2.Marshal(generic)
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(string(out), "\n")
}

// fromYAMLBytes decodes YAML as Helm does (sigs.k8s.io/yaml: via JSON, so numbers are float64).
func fromYAMLBytes(data []byte, out interface{}) error {
	var generic interface{}
	if err := yaml2.Unmarshal(data, &generic); err != nil {
		return err
	}
	j, err := json.Marshal(jsonable(generic))
	if err != nil {
		return err
	}
	return json.Unmarshal(j, out)
}

// jsonable turns yaml.v2's map[interface{}]interface{} into map[string]interface{}.
func jsonable(v interface{}) interface{} {
	switch x := v.(type) {
	case map[interface{}]interface{}:
		m := map[string]interface{}{}
		for k, val := range x {
			m[fmt.Sprint(k)] = jsonable(val)
		}
		return m
	case []interface{}:
		for i := range x {
			x[i] = jsonable(x[i])
		}
		return x
	}
	return v
}

// coalesce merges src over dst as Helm merges user values over chart values: maps merge, anything
// else replaces, and a null in src deletes the key.
func coalesce(dst, src map[string]interface{}) map[string]interface{} {
	for k, sv := range src {
		if sv == nil {
			delete(dst, k)
			continue
		}
		dm, dIsMap := dst[k].(map[string]interface{})
		sm, sIsMap := sv.(map[string]interface{})
		if dIsMap && sIsMap {
			dst[k] = coalesce(dm, sm)
		} else {
			dst[k] = sv
		}
	}
	return dst
}

func readValues(file string) (map[string]interface{}, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	vals := map[string]interface{}{}
	if err := fromYAMLBytes(data, &vals); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	if vals == nil {
		vals = map[string]interface{}{}
	}
	return vals, nil
}

func funcMap(root *template.Template) template.FuncMap {
	f := sprig.TxtFuncMap()
	delete(f, "env")
	delete(f, "expandenv")
	f["toYaml"] = func(v interface{}) string { return toYAML(v) }
	f["mustToYaml"] = func(v interface{}) (string, error) { return toYAML(v), nil }
	f["fromYaml"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := fromYAMLBytes([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	f["fromYamlArray"] = func(s string) []interface{} {
		a := []interface{}{}
		if err := fromYAMLBytes([]byte(s), &a); err != nil {
			a = []interface{}{err.Error()}
		}
		return a
	}
	f["toJson"] = func(v interface{}) string { j, _ := json.Marshal(v); return string(j) }
	f["mustToJson"] = func(v interface{}) (string, error) { j, err := json.Marshal(v); return string(j), err }
	f["fromJson"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := json.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	f["fromJsonArray"] = func(s string) []interface{} {
		a := []interface{}{}
		if err := json.Unmarshal([]byte(s), &a); err != nil {
			a = []interface{}{err.Error()}
		}
		return a
	}
	f["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil {
			return v, errors.New(msg)
		}
		if s, ok := v.(string); ok && s == "" {
			return v, errors.New(msg)
		}
		return v, nil
	}
	f["lookup"] = func(apiVersion, kind, namespace, name string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil
	}
	f["include"] = func(name string, data interface{}) (string, error) {
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, name, data); err != nil {
			return "", err
		}
		return buf.String(), nil
	}
	f["tpl"] = func(text string, data interface{}) (string, error) {
		t, err := root.Clone()
		if err != nil {
			return "", err
		}
		t, err = t.New("tpl").Parse(text)
		if err != nil {
			return "", err
		}
		var buf bytes.Buffer
		if err := t.Execute(&buf, data); err != nil {
			return "", err
		}
		return strings.ReplaceAll(buf.String(), "<no value>", ""), nil
	}
	return f
}

func main() {
	var valueFiles stringList
	var extraAPIs stringList
	chartDir := flag.String("chart", "", "chart directory")
	name := flag.String("name", "release", "release name")
	namespace := flag.String("namespace", "default", "release namespace")
	kubeVersion := flag.String("kube-version", "v1.30.0", "Capabilities.KubeVersion")
	strict := flag.Bool("strict", false, "fail on a missing map key (helm lint --strict)")
	flag.Var(&valueFiles, "values", "values file, repeatable; later files win")
	flag.Var(&extraAPIs, "api-versions", "extra Capabilities.APIVersions, repeatable")
	flag.Parse()
	if err := run(*chartDir, *name, *namespace, *kubeVersion, *strict, valueFiles, extraAPIs); err != nil {
		fmt.Fprintln(os.Stderr, "Error:", err)
		os.Exit(1)
	}
}

func run(chartDir, name, namespace, kubeVersion string, strict bool, valueFiles, extraAPIs []string) error {
	var meta chartMeta
	raw, err := os.ReadFile(filepath.Join(chartDir, "Chart.yaml"))
	if err != nil {
		return err
	}
	if err := yaml2.UnmarshalStrict(raw, &meta); err != nil {
		return fmt.Errorf("Chart.yaml: %w", err)
	}
	if meta.KubeVersion != "" {
		// helm refuses a chart whose kubeVersion constraint the cluster does not meet
		constraint, err := semver.NewConstraint(meta.KubeVersion)
		if err != nil {
			return fmt.Errorf("Chart.yaml kubeVersion: %w", err)
		}
		v, err := semver.NewVersion(kubeVersion)
		if err != nil {
			return fmt.Errorf("-kube-version: %w", err)
		}
		if !constraint.Check(v) {
			return fmt.Errorf("chart requires kubeVersion: %s which is incompatible with Kubernetes %s", meta.KubeVersion, kubeVersion)
		}
	}
	values, err := readValues(filepath.Join(chartDir, "values.yaml"))
	if err != nil {
		return err
	}
	for _, vf := range valueFiles {
		user, err := readValues(vf)
		if err != nil {
			return err
		}
		values = coalesce(values, user)
	}

	chartFiles := files{}
	var templates []string
	skip := map[string]bool{"Chart.yaml": true, "values.yaml": true, "values.schema.json": true, "Chart.lock": true}
	err = filepath.WalkDir(chartDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(chartDir, p)
		rel = filepath.ToSlash(rel)
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		switch {
		case strings.HasPrefix(rel, "templates/"):
			templates = append(templates, rel)
		case !skip[rel] && !strings.HasPrefix(rel, "charts/"):
			chartFiles[rel] = data
		}
		return nil
	})
	if err != nil {
		return err
	}
	sort.Strings(templates)

	root := template.New("gotpl")
	if strict {
		root.Option("missingkey=error")
	} else {
		root.Option("missingkey=zero")
	}
	root.Funcs(funcMap(root))
	for _, rel := range templates {
		data, _ := os.ReadFile(filepath.Join(chartDir, rel))
		if _, err := root.New(path.Join(meta.Name, rel)).Parse(string(data)); err != nil {
			return err
		}
	}

	major, minor := "1", "30"
	if parts := strings.Split(strings.TrimPrefix(kubeVersion, "v"), "."); len(parts) >= 2 {
		major, minor = parts[0], parts[1]
	}
	apis := apiVersions{"v1", "apps/v1", "batch/v1", "policy/v1", "autoscaling/v1", "autoscaling/v2",
		"networking.k8s.io/v1", "rbac.authorization.k8s.io/v1"}
	apis = append(apis, extraAPIs...)
	top := map[string]interface{}{
		"Values": values,
		"Chart":  meta,
		"Files":  chartFiles,
		"Release": map[string]interface{}{
			"Name": name, "Namespace": namespace, "Service": "Helm",
			"IsInstall": true, "IsUpgrade": false, "Revision": 1,
		},
		"Capabilities": map[string]interface{}{
			"KubeVersion": map[string]interface{}{
				"Version": kubeVersion, "GitVersion": kubeVersion, "Major": major, "Minor": minor,
			},
			"APIVersions": apis,
			"HelmVersion": map[string]interface{}{"Version": "v3.16.0"},
		},
	}

	type manifest struct {
		Source  string `json:"source"`
		Content string `json:"content"`
	}
	out := struct {
		Values    map[string]interface{} `json:"values"`
		Manifests []manifest             `json:"manifests"`
		Notes     string                 `json:"notes"`
	}{Values: values, Manifests: []manifest{}}
	for _, rel := range templates {
		base := path.Base(rel)
		if strings.HasPrefix(base, "_") {
			continue
		}
		full := path.Join(meta.Name, rel)
		vals := map[string]interface{}{}
		for k, v := range top {
			vals[k] = v
		}
		vals["Template"] = map[string]interface{}{"Name": full, "BasePath": path.Join(meta.Name, "templates")}
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, full, vals); err != nil {
			return err
		}
		text := strings.ReplaceAll(buf.String(), "<no value>", "")
		if base == "NOTES.txt" {
			out.Notes = text
			continue
		}
		if strings.TrimSpace(text) != "" {
			out.Manifests = append(out.Manifests, manifest{Source: full, Content: text})
		}
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", " ")
	return enc.Encode(out)
}
