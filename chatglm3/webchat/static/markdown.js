// Markdown for the model's answers, rendered by building DOM nodes: every piece of text goes in
// through createTextNode/textContent, never as HTML, so the model's output (untrusted) can show
// tags but never create elements, attributes or script. Links keep only http(s) and mailto URLs.
// A subset: fenced code, headings, lists (nested by indentation), quotes, tables, rules,
// paragraphs (single newlines kept as line breaks); inline code, bold, italic, strikethrough,
// links and autolinks. Images are never loaded (offline page, strict CSP): they show as links.

const FENCE = /^ {0,3}(`{3,}|~{3,})[ \t]*([^`\s]*)/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])(?:[ \t]+(.*)|$)/;
const TABLE_DELIMITER = /^ *\|? *:?-+:? *(?:\| *:?-+:? *)*\|? *$/;
const BLANK = /^[ \t]*$/;
const SAFE_URL = /^(?:https?:\/\/|mailto:)/i;

function el(tag, parent, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (parent) parent.appendChild(node);
  return node;
}

function closesFence(line, fence) {
  const m = /^ {0,3}(`{3,}|~{3,})[ \t]*$/.exec(line);
  return m !== null && m[1][0] === fence[0] && m[1].length >= fence.length;
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
    ITEM.test(line);
}

function indentOf(line) {
  return line.length - line.trimStart().length;
}

// The cells of a table row: split on pipes that are not escaped, outer pipes dropped.
function cells(line) {
  let s = line.trim();
  if (s.startsWith("|")) s = s.slice(1);
  if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
  const out = [];
  let cur = "";
  for (let i = 0; i < s.length; i++) {
    if (s[i] === "\\" && s[i + 1] === "|") { cur += "|"; i++; }
    else if (s[i] === "|") { out.push(cur.trim()); cur = ""; }
    else cur += s[i];
  }
  out.push(cur.trim());
  return out;
}

export function codeBlock(parent, code, lang) {
  const wrap = el("div", parent, "code");
  const bar = el("div", wrap, "code-bar");
  const safeLang = (lang || "").replace(/[^\w+#.-]/g, "").slice(0, 32);
  el("span", bar, "code-lang").textContent = safeLang || "code";
  if (navigator.clipboard) {
    const copy = el("button", bar, "copy");
    copy.type = "button";
    copy.textContent = "Copy";
    copy.addEventListener("click", () => {
      navigator.clipboard.writeText(code).then(() => { copy.textContent = "Copied"; },
                                               () => { copy.textContent = "Copy failed"; });
    });
  }
  const pre = el("pre", wrap);
  const c = el("code", pre);
  if (safeLang) c.className = "language-" + safeLang;
  c.textContent = code;
}

// Renders the lines of a block sequence into parent.
function blocks(lines, parent) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (BLANK.test(line)) { i++; continue; }
    if ((m = FENCE.exec(line))) {
      const body = [];
      i++;
      while (i < lines.length && !closesFence(lines[i], m[1])) body.push(lines[i++]);
      i++;  // the closing fence (or past the end: a block still streaming)
      codeBlock(parent, body.join("\n"), m[2]);
      continue;
    }
    if ((m = HEADING.exec(line))) {
      inline(m[2] || "", el("h" + Math.min(m[1].length + 2, 6), parent));  // h3..h6: inside a message
      i++;
      continue;
    }
    if (RULE.test(line)) { el("hr", parent); i++; continue; }
    if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) { inner.push(m[1]); i++; }
      blocks(inner, el("blockquote", parent));
      continue;
    }
    if (ITEM.test(line)) { i = list(lines, i, parent); continue; }
    if (line.includes("|") && i + 1 < lines.length && TABLE_DELIMITER.test(lines[i + 1]) &&
        lines[i + 1].includes("-")) {
      i = table(lines, i, parent);
      continue;
    }
    const para = [];
    while (i < lines.length && !BLANK.test(lines[i]) && (para.length === 0 || !startsBlock(lines[i]))) {
      para.push(lines[i++].trim());
    }
    const p = el("p", parent);
    para.forEach((text, k) => {
      if (k > 0) el("br", p);
      inline(text, p);
    });
  }
}

function list(lines, i, parent) {
  const first = ITEM.exec(lines[i]);
  const base = first[1].length;
  const ordered = /\d/.test(first[2]);
  const kind = ordered ? first[2].slice(-1) : first[2];
  const node = el(ordered ? "ol" : "ul", parent);
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  while (i < lines.length) {
    const m = ITEM.exec(lines[i]);
    if (!m || m[1].length !== base || (/\d/.test(m[2]) ? m[2].slice(-1) : m[2]) !== kind) break;
    const item = [m[3] || ""];
    const contentIndent = base + m[2].length + 1;
    i++;
    while (i < lines.length) {
      const line = lines[i];
      if (BLANK.test(line)) {
        // A blank line stays in the item only if the item goes on, indented, after it.
        let j = i;
        while (j < lines.length && BLANK.test(lines[j])) j++;
        if (j < lines.length && indentOf(lines[j]) > base) {
          for (; i < j; i++) item.push("");
          continue;
        }
        break;
      }
      const indent = indentOf(line);
      if (indent <= base && (ITEM.test(line) || startsBlock(line))) break;
      item.push(line.slice(Math.min(indent, contentIndent)));
      i++;
    }
    blocks(item, el("li", node));
    // Blank lines between two items of this list keep it one list.
    let j = i;
    while (j < lines.length && BLANK.test(lines[j])) j++;
    const next = j < lines.length ? ITEM.exec(lines[j]) : null;
    if (next && next[1].length === base) i = j;
  }
  return i;
}

function table(lines, i, parent) {
  const head = cells(lines[i]);
  const align = cells(lines[i + 1]).map((c) =>
    c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" : "");
  const wrap = el("div", parent, "table");
  const t = el("table", wrap);
  const tr = el("tr", el("thead", t));
  head.forEach((text, k) => inline(text, el("th", tr, align[k] ? "align-" + align[k] : "")));
  const body = el("tbody", t);
  i += 2;
  while (i < lines.length && !BLANK.test(lines[i]) && lines[i].includes("|")) {
    const row = el("tr", body);
    const cs = cells(lines[i]);
    head.forEach((_, k) => inline(cs[k] || "", el("td", row, align[k] ? "align-" + align[k] : "")));
    i++;
  }
  return i;
}

// Inline spans, each matched at its own position (sticky), within one line: the cost of a line
// is bounded by its length times the few patterns that can start at each delimiter.
const SPANS = [
  ["escape", /\\([!-/:-@[-`{-~])/y],
  ["code", /(`+)([^`]|[^`].*?[^`])\1(?!`)/y],
  ["image", /!\[([^\]]*)\]\(\s*<?([^\s<>()]*)>?(?:\s+"[^"]*")?\s*\)/y],
  ["link", /\[((?:[^[\]\\]|\\.)+)\]\(\s*<?([^\s<>()]*)>?(?:\s+"[^"]*")?\s*\)/y],
  ["autolink", /<((?:https?:\/\/|mailto:)[^\s<>]+)>/y],
  ["strong", /\*\*(?=\S)(.*?\S)\*\*/y],
  ["strong", /__(?=\S)(.*?\S)__(?!\w)/y],
  ["strike", /~~(?=\S)(.*?\S)~~/y],
  ["em", /\*(?=[^\s*])(.*?[^\s*])\*(?!\*)/y],
  ["em", /_(?=[^\s_])(.*?[^\s_])_(?!\w)/y],
];
const TRIGGERS = new Set(["\\", "`", "!", "[", "<", "*", "_", "~"]);

function link(parent, url, label) {
  if (!SAFE_URL.test(url)) {  // javascript:, data:, relative paths...: text only
    inline(label, parent);
    return;
  }
  const a = el("a", parent);
  a.href = url;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  inline(label, a);
}

export function inline(text, parent) {
  let plain = "";
  const flush = () => {
    if (plain) parent.appendChild(document.createTextNode(plain));
    plain = "";
  };
  let pos = 0;
  while (pos < text.length) {
    const ch = text[pos];
    let matched = null;
    if (TRIGGERS.has(ch) && !(ch === "_" && pos > 0 && /\w/.test(text[pos - 1]))) {
      for (const [kind, re] of SPANS) {
        re.lastIndex = pos;
        const m = re.exec(text);
        if (m) { matched = [kind, m]; break; }
      }
    }
    if (!matched) { plain += ch; pos++; continue; }
    const [kind, m] = matched;
    pos += m[0].length;
    if (kind === "escape") { plain += m[1]; continue; }  // stays in the same text node
    flush();
    if (kind === "code") el("code", parent).textContent = m[2].length > 2 &&
      m[2].startsWith(" ") && m[2].endsWith(" ") ? m[2].slice(1, -1) : m[2];
    else if (kind === "image") link(parent, m[2], "[image: " + (m[1] || m[2]) + "]");
    else if (kind === "link") link(parent, m[2], m[1]);
    else if (kind === "autolink") link(parent, m[1], m[1]);
    else inline(m[1], el(kind === "strong" ? "strong" : kind === "em" ? "em" : "del", parent));
  }
  flush();
}

// The offset up to which `text` is complete blocks (a blank line outside a code fence ends
// them), looking from `from` (an earlier answer of this function, or 0): a streaming answer
// renders that part once and re-renders only the rest, so each update costs the last block.
export function stableEnd(text, from = 0) {
  let fence = null;
  let end = from;
  let start = from;
  while (true) {
    const nl = text.indexOf("\n", start);
    if (nl < 0) return end;
    const line = text.slice(start, nl);
    if (fence) {
      if (closesFence(line, fence)) fence = null;
    } else {
      const m = FENCE.exec(line);
      if (m) fence = m[1];
      else if (BLANK.test(line)) end = nl + 1;
    }
    start = nl + 1;
  }
}

// Appends the rendering of a Markdown text to parent.
export function render(text, parent) {
  blocks(text.replace(/\r\n?/g, "\n").split("\n"), parent);
}
