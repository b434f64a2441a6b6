// A small, safe Markdown subset for model answers. Safety comes from the order: the whole text is
// HTML-escaped first, so nothing the model writes can become a tag or an attribute; only the markup
// below is added afterwards, and links are kept only for http(s) and mailto URLs.
// Subset: fenced code (```), inline `code`, **bold**, *italic*, # headings, - and 1. lists,
// > quotes, --- rules, [links](https://...), paragraphs and line breaks. An unclosed fence (while an
// answer streams) renders as code up to the end.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

export function renderMarkdown(source) {
  const text = escapeHtml(String(source).replace(/\0/g, "").replace(/\r\n?/g, "\n"));
  const parts = text.split(/^```/m); // odd parts are fenced code: "lang\n...code..."
  let html = "";
  parts.forEach((part, i) => {
    if (i % 2 === 0) {
      html += blocks(part);
    } else {
      const nl = part.indexOf("\n");
      const lang = nl < 0 ? "" : part.slice(0, nl).trim();
      const code = nl < 0 ? "" : part.slice(nl + 1).replace(/\n$/, "");
      const cls = /^[\w+-]+$/.test(lang) ? ` class="language-${lang}"` : "";
      html += `<pre><code${cls}>${code}</code></pre>`;
    }
  });
  return html;
}

// text after a closing fence starts with the rest of the fence line; blocks() treats it as text
function blocks(text) {
  const out = [];
  let para = [];
  let list = null; // {tag, items}
  const flushPara = () => {
    if (para.length) out.push(`<p>${para.map(inline).join("<br>")}</p>`);
    para = [];
  };
  const flushList = () => {
    if (list) out.push(`<${list.tag}>${list.items.map((t) => `<li>${inline(t)}</li>`).join("")}</${list.tag}>`);
    list = null;
  };
  for (const line of text.split("\n")) {
    let m;
    if (!line.trim()) {
      flushPara();
      flushList();
    } else if ((m = line.match(/^(#{1,6})\s+(.*)$/))) {
      flushPara();
      flushList();
      out.push(`<h${m[1].length}>${inline(m[2])}</h${m[1].length}>`);
    } else if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
      flushPara();
      flushList();
      out.push("<hr>");
    } else if ((m = line.match(/^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/))) {
      flushPara();
      const tag = /\d/.test(m[1]) ? "ol" : "ul";
      if (list && list.tag !== tag) flushList();
      list = list || { tag, items: [] };
      list.items.push(m[2]);
    } else if ((m = line.match(/^&gt;\s?(.*)$/))) {
      flushPara();
      flushList();
      out.push(`<blockquote>${inline(m[1])}</blockquote>`);
    } else if (list && /^\s+\S/.test(line)) {
      list.items[list.items.length - 1] += " " + line.trim();
    } else {
      flushList();
      para.push(line);
    }
  }
  flushPara();
  flushList();
  return out.join("");
}

const SAFE_URL = /^(https?:\/\/|mailto:)[^\s]*$/i;

function inline(text) {
  const kept = []; // code spans and links, kept out of the emphasis rules
  const keep = (html) => `\0${kept.push(html) - 1}\0`;
  text = text
    .replace(/`([^`]+)`/g, (_, code) => keep(`<code>${code}</code>`))
    .replace(/\[([^\]]+)\]\(([^)\s]+)\)/g, (whole, label, url) =>
      SAFE_URL.test(url)
        ? keep(`<a href="${url}" target="_blank" rel="noopener noreferrer nofollow">${emphasis(label)}</a>`)
        : whole,
    );
  let html = emphasis(text);
  while (html.includes("\0")) html = html.replace(/\0(\d+)\0/g, (_, i) => kept[Number(i)]); // links hold code
  return html;
}

function emphasis(text) {
  return text
    .replace(/\*\*(?=\S)([^*]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^_\w])__(?=\S)([^_]*?\S)__(?!\w)/g, "$1<strong>$2</strong>") // not inside snake__case
    .replace(/(^|[^*\w])\*(?=\S)([^*]*?\S)\*(?!\w)/g, "$1<em>$2</em>")
    .replace(/(^|[^_\w])_(?=\S)([^_]*?\S)_(?!\w)/g, "$1<em>$2</em>");
}
