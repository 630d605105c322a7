// Account creation for relays with a self-signed certificate.
//
// Delta Chat does not fetch DCACCOUNT: URLs from servers with self-signed certificates, so
// the page asks this relay's /new for fresh credentials and shows them as a dclogin: link
// and QR code. The QR code is drawn here because the credentials differ on every request
// and the page must not load anything from elsewhere.
//
// The encoder writes byte-mode QR codes, error correction level M, versions 1-40
// (ISO/IEC 18004). Part of chatmail-relay, MIT licence.
"use strict";

const QR = (() => {
  // Per version (index 1-40), level M: error correction codewords per block, block count.
  const EC_PER_BLOCK = [0, 10, 16, 26, 18, 24, 16, 18, 22, 22, 26, 30, 22, 22, 24, 24, 28, 28,
    26, 26, 26, 26, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28];
  const BLOCKS = [0, 1, 1, 1, 2, 2, 4, 4, 4, 5, 5, 5, 8, 9, 9, 10, 10, 11, 13, 14, 16, 17, 17,
    18, 20, 21, 23, 25, 26, 28, 29, 31, 33, 35, 37, 38, 40, 43, 45, 47, 49];
  const LEVEL_M_FORMAT_BITS = 0;

  // Modules available for data and error correction in a symbol of this version.
  function rawModules(version) {
    let n = (16 * version + 128) * version + 64;
    if (version >= 2) {
      const align = Math.floor(version / 7) + 2;
      n -= (25 * align - 10) * align - 55;
      if (version >= 7) n -= 36;
    }
    return n;
  }

  function dataCodewords(version) {
    return Math.floor(rawModules(version) / 8) - EC_PER_BLOCK[version] * BLOCKS[version];
  }

  function alignmentPositions(version) {
    if (version === 1) return [];
    const count = Math.floor(version / 7) + 2;
    const last = version * 4 + 10;
    const step = version === 32 ? 26
      : Math.ceil((last - 6) / (count - 1) / 2) * 2;
    const positions = [6];
    for (let i = count - 2; i >= 0; i--) positions.push(last - i * step);
    return positions;
  }

  // Arithmetic in GF(2^8) with the QR polynomial x^8 + x^4 + x^3 + x^2 + 1.
  function gfMultiply(a, b) {
    let product = 0;
    for (let bit = 7; bit >= 0; bit--) {
      product = (product << 1) ^ ((product >>> 7) * 0x11d);
      if ((b >>> bit) & 1) product ^= a;
    }
    return product;
  }

  function reedSolomonGenerator(degree) {
    const coefficients = new Array(degree).fill(0);
    coefficients[degree - 1] = 1;
    let root = 1;
    for (let i = 0; i < degree; i++) {
      for (let j = 0; j < degree; j++) {
        coefficients[j] = gfMultiply(coefficients[j], root);
        if (j + 1 < degree) coefficients[j] ^= coefficients[j + 1];
      }
      root = gfMultiply(root, 2);
    }
    return coefficients;
  }

  function reedSolomonRemainder(data, generator) {
    const remainder = new Array(generator.length).fill(0);
    for (const byte of data) {
      const factor = byte ^ remainder.shift();
      remainder.push(0);
      generator.forEach((coefficient, i) => { remainder[i] ^= gfMultiply(coefficient, factor); });
    }
    return remainder;
  }

  function chooseVersion(byteCount) {
    for (let version = 1; version <= 40; version++) {
      const countBits = version < 10 ? 8 : 16;
      if (4 + countBits + 8 * byteCount <= dataCodewords(version) * 8) return version;
    }
    throw new Error("text too long for a QR code");
  }

  // Mode indicator, length, bytes, terminator and padding, as codewords.
  function dataStream(bytes, version) {
    const bits = [];
    const put = (value, length) => {
      for (let i = length - 1; i >= 0; i--) bits.push((value >>> i) & 1);
    };
    const capacity = dataCodewords(version) * 8;
    put(0b0100, 4);
    put(bytes.length, version < 10 ? 8 : 16);
    bytes.forEach((byte) => put(byte, 8));
    put(0, Math.min(4, capacity - bits.length));
    put(0, (8 - (bits.length % 8)) % 8);
    for (let pad = 0xec; bits.length < capacity; pad ^= 0xec ^ 0x11) put(pad, 8);
    const codewords = [];
    for (let i = 0; i < bits.length; i += 8) {
      codewords.push(bits.slice(i, i + 8).reduce((value, bit) => (value << 1) | bit, 0));
    }
    return codewords;
  }

  // Split into blocks, append error correction, interleave.
  function finalCodewords(data, version) {
    const blockCount = BLOCKS[version];
    const ecLength = EC_PER_BLOCK[version];
    const total = Math.floor(rawModules(version) / 8);
    const shortBlocks = blockCount - (total % blockCount);
    const shortLength = Math.floor(total / blockCount) - ecLength;
    const generator = reedSolomonGenerator(ecLength);
    const dataBlocks = [];
    const ecBlocks = [];
    for (let i = 0, offset = 0; i < blockCount; i++) {
      const length = shortLength + (i < shortBlocks ? 0 : 1);
      const block = data.slice(offset, offset + length);
      offset += length;
      dataBlocks.push(block);
      ecBlocks.push(reedSolomonRemainder(block, generator));
    }
    const result = [];
    for (let i = 0; i <= shortLength; i++) {
      dataBlocks.forEach((block) => { if (i < block.length) result.push(block[i]); });
    }
    for (let i = 0; i < ecLength; i++) ecBlocks.forEach((block) => result.push(block[i]));
    return result;
  }

  function bchBits(value, valueBits, generator, generatorDegree) {
    let remainder = value << generatorDegree;
    for (let bit = valueBits + generatorDegree - 1; bit >= generatorDegree; bit--) {
      if ((remainder >>> bit) & 1) remainder ^= generator << (bit - generatorDegree);
    }
    return (value << generatorDegree) | remainder;
  }

  const MASKS = [
    (r, c) => (r + c) % 2 === 0,
    (r) => r % 2 === 0,
    (r, c) => c % 3 === 0,
    (r, c) => (r + c) % 3 === 0,
    (r, c) => (Math.floor(r / 2) + Math.floor(c / 3)) % 2 === 0,
    (r, c) => ((r * c) % 2) + ((r * c) % 3) === 0,
    (r, c) => (((r * c) % 2) + ((r * c) % 3)) % 2 === 0,
    (r, c) => (((r + c) % 2) + ((r * c) % 3)) % 2 === 0,
  ];

  class Symbol {
    constructor(version) {
      this.size = version * 4 + 17;
      this.dark = Array.from({ length: this.size }, () => new Array(this.size).fill(false));
      this.reserved = Array.from({ length: this.size }, () => new Array(this.size).fill(false));
    }

    setFunction(row, col, dark) {
      this.dark[row][col] = dark;
      this.reserved[row][col] = true;
    }

    drawFinder(top, left) {
      for (let dr = -1; dr <= 7; dr++) {
        for (let dc = -1; dc <= 7; dc++) {
          const row = top + dr;
          const col = left + dc;
          if (row < 0 || col < 0 || row >= this.size || col >= this.size) continue;
          const ring = Math.max(Math.abs(dr - 3), Math.abs(dc - 3));
          this.setFunction(row, col, ring !== 2 && ring !== 4);
        }
      }
    }

    drawFunctionPatterns(version) {
      const size = this.size;
      for (let i = 0; i < size; i++) {
        this.setFunction(6, i, i % 2 === 0);
        this.setFunction(i, 6, i % 2 === 0);
      }
      this.drawFinder(0, 0);
      this.drawFinder(0, size - 7);
      this.drawFinder(size - 7, 0);
      const positions = alignmentPositions(version);
      const last = positions.length - 1;
      positions.forEach((row, i) => positions.forEach((col, j) => {
        const onFinder = (i === 0 && j === 0) || (i === 0 && j === last) || (i === last && j === 0);
        if (onFinder) return;
        for (let dr = -2; dr <= 2; dr++) {
          for (let dc = -2; dc <= 2; dc++) {
            this.setFunction(row + dr, col + dc, Math.max(Math.abs(dr), Math.abs(dc)) !== 1);
          }
        }
      }));
      this.drawFormat(0); // reserves the format areas; the real bits come with the mask
      if (version >= 7) {
        const bits = bchBits(version, 6, 0x1f25, 12);
        for (let i = 0; i < 18; i++) {
          const dark = ((bits >>> i) & 1) === 1;
          const a = size - 11 + (i % 3);
          const b = Math.floor(i / 3);
          this.setFunction(b, a, dark);
          this.setFunction(a, b, dark);
        }
      }
    }

    drawFormat(mask) {
      const size = this.size;
      const bits = bchBits((LEVEL_M_FORMAT_BITS << 3) | mask, 5, 0x537, 10) ^ 0x5412;
      const bit = (i) => ((bits >>> i) & 1) === 1;
      for (let i = 0; i <= 5; i++) this.setFunction(i, 8, bit(i));
      this.setFunction(7, 8, bit(6));
      this.setFunction(8, 8, bit(7));
      this.setFunction(8, 7, bit(8));
      for (let i = 9; i < 15; i++) this.setFunction(8, 14 - i, bit(i));
      for (let i = 0; i < 8; i++) this.setFunction(8, size - 1 - i, bit(i));
      for (let i = 8; i < 15; i++) this.setFunction(size - 15 + i, 8, bit(i));
      this.setFunction(size - 8, 8, true);
    }

    // Codeword bits go up and down two-module columns, right to left, around the patterns.
    placeData(codewords) {
      const size = this.size;
      let index = 0;
      for (let right = size - 1; right >= 1; right -= 2) {
        if (right === 6) right = 5;
        const upward = ((right + 1) & 2) === 0;
        for (let step = 0; step < size; step++) {
          const row = upward ? size - 1 - step : step;
          for (let col = right; col > right - 2; col--) {
            if (this.reserved[row][col]) continue;
            if (index < codewords.length * 8) {
              this.dark[row][col] = ((codewords[index >>> 3] >>> (7 - (index & 7))) & 1) === 1;
              index++;
            }
          }
        }
      }
    }

    applyMask(mask) {
      for (let row = 0; row < this.size; row++) {
        for (let col = 0; col < this.size; col++) {
          if (!this.reserved[row][col] && MASKS[mask](row, col)) {
            this.dark[row][col] = !this.dark[row][col];
          }
        }
      }
    }

    // The standard's penalty score: lower is easier to scan.
    penalty() {
      const size = this.size;
      const dark = this.dark;
      let score = 0;
      const lines = [];
      for (let i = 0; i < size; i++) {
        lines.push(dark[i]);
        lines.push(dark.map((row) => row[i]));
      }
      const finderLike = [true, false, true, true, true, false, true];
      for (const line of lines) {
        let run = 1;
        for (let i = 1; i <= size; i++) {
          if (i < size && line[i] === line[i - 1]) {
            run++;
          } else {
            if (run >= 5) score += run - 2;
            run = 1;
          }
        }
        for (let i = 0; i + 7 <= size; i++) {
          if (!finderLike.every((value, k) => line[i + k] === value)) continue;
          const lightBefore = i >= 4 && [1, 2, 3, 4].every((k) => !line[i - k]);
          const lightAfter = i + 11 <= size && [7, 8, 9, 10].every((k) => !line[i + k]);
          if (lightBefore || lightAfter) score += 40;
        }
      }
      let darkCount = 0;
      for (let row = 0; row < size; row++) {
        for (let col = 0; col < size; col++) {
          if (dark[row][col]) darkCount++;
          if (row + 1 < size && col + 1 < size) {
            const colour = dark[row][col];
            if (dark[row][col + 1] === colour && dark[row + 1][col] === colour
              && dark[row + 1][col + 1] === colour) score += 3;
          }
        }
      }
      const percent = (darkCount * 100) / (size * size);
      score += Math.floor(Math.abs(percent - 50) / 5) * 10;
      return score;
    }
  }

  // The QR code for `text` as rows of booleans (true = dark), without quiet zone.
  function encode(text) {
    const bytes = Array.from(new TextEncoder().encode(text));
    const version = chooseVersion(bytes.length);
    const symbol = new Symbol(version);
    symbol.drawFunctionPatterns(version);
    symbol.placeData(finalCodewords(dataStream(bytes, version), version));
    let best = null;
    for (let mask = 0; mask < 8; mask++) {
      symbol.applyMask(mask);
      symbol.drawFormat(mask);
      const score = symbol.penalty();
      if (best === null || score < best.score) best = { mask, score };
      symbol.applyMask(mask); // XOR again restores the unmasked data
    }
    symbol.applyMask(best.mask);
    symbol.drawFormat(best.mask);
    return symbol.dark;
  }

  // Same drawing as the builder's Python side: quiet zone of 4, caption under the code.
  function svg(matrix, caption, label) {
    const ns = "http://www.w3.org/2000/svg";
    const quiet = 4;
    const width = matrix.length + 2 * quiet;
    const captionHeight = caption ? 5 : 0;
    const height = width + captionHeight;
    const element = document.createElementNS(ns, "svg");
    element.setAttribute("viewBox", `0 0 ${width} ${height}`);
    element.setAttribute("role", "img");
    element.setAttribute("aria-label", label);
    const title = document.createElementNS(ns, "title");
    title.textContent = label;
    element.appendChild(title);
    const background = document.createElementNS(ns, "rect");
    background.setAttribute("width", width);
    background.setAttribute("height", height);
    background.setAttribute("fill", "#fff");
    element.appendChild(background);
    let d = "";
    matrix.forEach((row, y) => {
      for (let x = 0; x < row.length; x++) {
        if (!row[x]) continue;
        let end = x;
        while (end + 1 < row.length && row[end + 1]) end++;
        d += `M${x + quiet} ${y + quiet}h${end - x + 1}v1h-${end - x + 1}z`;
        x = end;
      }
    });
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", d);
    path.setAttribute("fill", "#000");
    path.setAttribute("shape-rendering", "crispEdges");
    element.appendChild(path);
    if (caption) {
      const text = document.createElementNS(ns, "text");
      text.setAttribute("x", width / 2);
      text.setAttribute("y", width + 1.5);
      text.setAttribute("text-anchor", "middle");
      text.setAttribute("font-family", "sans-serif");
      text.setAttribute("font-size", Math.min(3.2, (width - 2) / (0.6 * caption.length)).toFixed(2));
      text.textContent = caption;
      element.appendChild(text);
    }
    return element;
  }

  return { encode, svg };
})();

(() => {
  const box = document.getElementById("account");
  if (!box) return;
  const domain = box.dataset.domain;
  const qrLink = document.getElementById("account-qr");
  const button = document.getElementById("account-link");
  const status = document.getElementById("account-status");
  const again = document.getElementById("account-again");

  function show(url) {
    const label = `QR code: log in to a new account on ${domain}`;
    qrLink.replaceChildren(QR.svg(QR.encode(url), domain, label));
    qrLink.href = url;
    button.href = url;
    button.removeAttribute("aria-disabled");
    status.textContent = "Scan the code with Delta Chat, or tap the button on your phone. "
      + "The account is created when Delta Chat first logs in.";
  }

  // The API explains refusals (closed, rate limit, low resources) in a JSON "detail".
  async function refusalReason(response) {
    try {
      const body = await response.json();
      if (typeof body.detail === "string") return body.detail;
    } catch (error) {
      // not JSON (a proxy's error page): fall back to the status code
    }
    return `the relay answered ${response.status}`;
  }

  async function fetchCredentials() {
    status.textContent = "Creating login credentials…";
    again.disabled = true;
    try {
      const response = await fetch(box.dataset.newUrl, {
        method: "POST",
        headers: { Accept: "application/json" },
        cache: "no-store",
      });
      if (!response.ok) throw new Error(await refusalReason(response));
      const data = await response.json();
      if (typeof data.dclogin_url !== "string" || !data.dclogin_url.startsWith("dclogin:")) {
        throw new Error("the relay sent no login link");
      }
      show(data.dclogin_url);
    } catch (error) {
      status.textContent = `Could not get login credentials: ${error.message}. Try again.`;
    } finally {
      again.disabled = false;
    }
  }

  again.hidden = false;
  again.addEventListener("click", fetchCredentials);
  fetchCredentials();
})();
