// A small Markdown renderer for model answers: fenced code, headings, lists, quotes,
// paragraphs, and inline code, bold, italics and http(s) links. It builds DOM nodes and sets
// only text on them (never markup), so nothing a model writes can become HTML.

const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*\d+[.)]\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;
const INLINE =
  /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([^*]+?)\*\*|__([^_]+?)__|\*([^*\s](?:[^*]*[^*\s])?)\*|\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g;

function element(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

function textElement(tag, text) {
  const node = element(tag);
  node.textContent = text;
  return node;
}

function appendInline(parent, text) {
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    if (match.index > last) parent.append(document.createTextNode(text.slice(last, match.index)));
    const [, ticks, code, bold, boldUnderscore, italic, label, href] = match;
    if (ticks) {
      parent.append(textElement("code", code));
    } else if (bold || boldUnderscore) {
      parent.append(textElement("strong", bold || boldUnderscore));
    } else if (italic) {
      parent.append(textElement("em", italic));
    } else {
      const link = textElement("a", label);
      link.href = href;
      link.rel = "noopener noreferrer nofollow";
      link.target = "_blank";
      parent.append(link);
    }
    last = match.index + match[0].length;
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}

function codeBlock(language, lines) {
  const block = element("div", "code-block");
  const bar = element("div", "code-bar");
  bar.append(textElement("span", language || "code"));
  const copy = textElement("button", "Copy");
  copy.type = "button";
  const text = lines.join("\n");
  copy.addEventListener("click", () => navigator.clipboard?.writeText(text));
  bar.append(copy);
  const pre = element("pre");
  pre.append(textElement("code", text));
  block.append(bar, pre);
  return block;
}

// Consecutive lines that `pattern` matches, from `start`: their captured text, and the next line.
function run(lines, start, pattern) {
  const items = [];
  let i = start;
  for (; i < lines.length; i++) {
    const match = lines[i].match(pattern);
    if (!match) break;
    items.push(match[1]);
  }
  return [items, i];
}

// Renders `text` into a fragment. An unclosed fence (an answer still streaming) runs to the end.
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  const lines = text.split("\n");
  let paragraph = [];
  const flush = () => {
    if (paragraph.length === 0) return;
    const p = element("p");
    appendInline(p, paragraph.join("\n"));
    fragment.append(p);
    paragraph = [];
  };
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(FENCE);
    if (fence) {
      flush();
      const body = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) body.push(lines[i]);
      fragment.append(codeBlock(fence[2], body));
      i++;
      continue;
    }
    const heading = line.match(HEADING);
    if (heading) {
      flush();
      const h = element(`h${Math.min(heading[1].length + 2, 6)}`);
      appendInline(h, heading[2]);
      fragment.append(h);
      i++;
      continue;
    }
    let list = null;
    for (const [pattern, tag] of [[BULLET, "ul"], [NUMBERED, "ol"], [QUOTE, "blockquote"]]) {
      if (pattern.test(line)) list = [pattern, tag];
      if (list) break;
    }
    if (list) {
      flush();
      const [items, next] = run(lines, i, list[0]);
      const block = element(list[1]);
      for (const item of items) {
        const child = element(list[1] === "blockquote" ? "p" : "li");
        appendInline(child, item);
        block.append(child);
      }
      fragment.append(block);
      i = next;
      continue;
    }
    if (line.trim() === "") flush();
    else paragraph.push(line);
    i++;
  }
  flush();
  return fragment;
}
