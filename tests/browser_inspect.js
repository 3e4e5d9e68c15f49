// What tests/test_browser.py asks of every page, once it has loaded and MathJax has finished:
// evaluated by Playwright (page.evaluate) and returning one object with what each check needs.
() => {
  const article = document.querySelector("article.bd-article") || document.querySelector("main")
    || document.body;
  const width = window.innerWidth;
  const short = (text, n = 60) => (text || "").replace(/\s+/g, " ").trim().slice(0, n);
  const describe = (el) => {
    const cls = typeof el.className === "string" ? el.className : el.getAttribute("class") || "";
    const rect = el.getBoundingClientRect();
    return `<${el.tagName.toLowerCase()}${cls ? ' class="' + short(cls, 80) + '"' : ""}> `
      + `${Math.round(rect.left)}-${Math.round(rect.right)} px: "${short(el.textContent, 40)}"`;
  };
  const headingOf = (el) => {
    const section = el.closest("section");
    const heading = section && section.querySelector("h1, h2, h3, h4, h5, h6");
    return heading ? short(heading.textContent.replace(/#$/, ""), 70) : "(no section)";
  };
  const hidden = (el) => {
    const style = getComputedStyle(el);
    return style.display === "none" || style.visibility !== "visible" || el.getClientRects().length === 0;
  };

  // 1. Width: nothing may push the page wider than the window.
  const scrollWidth = document.documentElement.scrollWidth;
  const offenders = [];
  if (scrollWidth > width) {
    const wide = new Set();
    for (const el of document.body.querySelectorAll("*")) {
      const rect = el.getBoundingClientRect();
      if (rect.right <= width + 0.5 || (rect.width === 0 && rect.height === 0)) continue;
      let clipped = false;  // inside a box that scrolls or clips and itself fits
      for (let a = el.parentElement; a && a !== document.documentElement; a = a.parentElement) {
        if (getComputedStyle(a).overflowX !== "visible" && a.getBoundingClientRect().right <= width + 0.5) {
          clipped = true;
          break;
        }
      }
      if (!clipped) wide.add(el);
    }
    // the outermost offenders: the element that is too wide, not everything inside it
    const outermost = [...wide].filter((el) => !wide.has(el.parentElement));
    outermost.sort((a, b) => b.getBoundingClientRect().right - a.getBoundingClientRect().right);
    for (const el of outermost.slice(0, 6)) offenders.push(describe(el));
  }

  // 2. Solutions: closed dropdowns holding the whole answer; no empty code boxes.
  const solutionProblems = [];
  const titleOf = (el) => {
    const title = el.querySelector(":scope > .admonition-title, :scope > summary");
    return short(title ? title.textContent : el.textContent, 50);
  };
  const isSolution = (el) => el.classList.contains("solution")
    || (el.matches(".admonition.dropdown, details") && /^\s*Solution/i.test(titleOf(el)));
  const solutions = [...article.querySelectorAll(".solution, .admonition.dropdown, details")].filter(isSolution);
  for (const el of solutions) {
    const name = titleOf(el);
    let body;
    if (el.tagName === "DETAILS") {
      if (el.open) solutionProblems.push(`"${name}" is open when the page loads`);
      body = [...el.children].filter((child) => child.tagName !== "SUMMARY");
    } else {
      if (!el.classList.contains("dropdown")) {
        solutionProblems.push(`"${name}" is not a dropdown (give it :class: dropdown)`);
      }
      body = [...el.children].filter((child) => !child.classList.contains("admonition-title"));
      const shown = body.filter((child) => !hidden(child));
      if (el.classList.contains("dropdown") && (!el.classList.contains("toggle-hidden") || shown.length)) {
        solutionProblems.push(`"${name}" is open when the page loads: "${short(shown.map((c) => c.textContent).join(" "))}"`);
      }
    }
    if (!short(body.map((child) => child.textContent).join(" "))) {
      solutionProblems.push(`"${name}" is empty`);
    }
  }
  // Text after a solution, before the next exercise, is an answer that escaped its dropdown
  // (the usual cause: a code fence inside the solution closed the directive early).
  for (const section of article.querySelectorAll("section")) {
    const heading = section.querySelector(":scope > h1, :scope > h2, :scope > h3");
    if (!heading || !/^\s*([\d.]+\s*)?Exercises\b/.test(heading.textContent)) continue;
    let after = null;
    for (const child of section.children) {
      if (child === heading) continue;
      if (solutions.includes(child)) { after = titleOf(child); continue; }
      if (child.matches(".exercise, section, h1, h2, h3, h4, h5, h6, .toggle-details")) { after = null; continue; }
      if (after && (short(child.textContent) || child.querySelector("pre, img"))) {
        solutionProblems.push(`after "${after}", outside any solution: <${child.tagName.toLowerCase()}> "${short(child.textContent)}"`);
      }
    }
  }
  for (const pre of article.querySelectorAll("pre")) {
    if (!pre.textContent.trim()) {
      const before = pre.closest(".highlight, div[class*='highlight-'], .cell") || pre;
      const previous = before.previousElementSibling;
      solutionProblems.push(`an empty code box in "${headingOf(pre)}", after "${short(previous ? previous.textContent : "", 50)}"`);
    }
  }

  // 3. Math: every math element typeset, no MathJax error, no raw delimiters left in the text.
  const mathProblems = [];
  const mathElements = [...article.querySelectorAll(".math")];
  for (const el of mathElements) {
    if (!el.querySelector("mjx-container")) mathProblems.push(`not typeset: "${short(el.textContent, 70)}"`);
  }
  for (const el of article.querySelectorAll("mjx-merror")) {
    const math = el.closest(".math, mjx-container") || el;
    mathProblems.push(`MathJax error "${el.getAttribute("data-mjx-error") || short(el.textContent)}" in "${short(math.getAttribute("aria-label") || math.textContent, 70)}"`);
  }
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT, {
    acceptNode: (node) => node.parentElement.closest("pre, code, script, style, textarea, mjx-container, .highlight")
      ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT,
  });
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const text = node.textContent;
    const raw = text.match(/\\\(|\\\[|\$\$/);
    if (raw) {
      mathProblems.push(`raw "${raw[0]}" in "${headingOf(node.parentElement)}": "${short(text.slice(Math.max(0, raw.index - 30)), 70)}"`);
    }
  }

  // 4. Figures: every image a cell drew sits in a numbered, captioned figure.
  const figureProblems = [];
  const images = [...article.querySelectorAll(".cell_output img, figure img, div.figure img")];
  images.forEach((img) => {
    const figure = img.closest("figure, div.figure");
    const caption = figure && figure.querySelector("figcaption, .caption");
    const number = caption && caption.querySelector(".caption-number");
    let problem = null;
    if (!figure) problem = "is not in a figure";
    else if (!caption || !short(caption.textContent)) problem = "is in a figure without a caption";
    else if (!number || !/^(Fig\.?|Figure)\s*\d/.test(number.textContent.trim())) problem = "has a caption without a figure number";
    if (problem) {
      const cell = img.closest(".cell");
      const code = cell && cell.querySelector(".cell_input pre");
      const lines = code ? code.textContent.split("\n").filter((line) => line.trim() && !line.trim().startsWith("#")) : [];
      const drawnBy = lines.length ? `, drawn by the cell starting "${short(lines[0], 50)}"` : "";
      figureProblems.push(`image in "${headingOf(img)}"${drawnBy} ${problem}`);
    }
  });

  return {
    scrollWidth, width, offenders, solutionProblems, mathProblems, figureProblems,
    mathCount: mathElements.length, solutionCount: solutions.length, imageCount: images.length,
  };
}
